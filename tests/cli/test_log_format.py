"""`--log-format json`: every line `iomtca serve` logs (supervisor and workers alike) is one JSON
object a log shipper can take as it is, the access lines included, and a hostile device id cannot
break a line in two."""
from __future__ import annotations

import json
import subprocess
import time

from tests.enroll.conftest import IOMTCA, curl, env, run


def test_serve_logs_json_lines_from_every_process(tmp_path):
    home = tmp_path / "ca"
    run([IOMTCA, "init", "--dir", home])
    with open(home / "config.toml", "a") as config:
        config.write("\n[enroll]\nworkers = 2\n")
    err = tmp_path / "serve.stderr"
    with open(err, "wb") as stderr:
        proc = subprocess.Popen([str(IOMTCA), "serve", "--dir", str(home), "--log-format", "json",
                                 "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                                 "--console-listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=stderr,
                                stdin=subprocess.DEVNULL, env=env(), text=True)
    try:
        ready = proc.stdout.readline()
        http = ready.split("ocsp=")[1].strip()
        hostile = "pump%0aINJECTED%20line"
        for path in ("/healthz", f"/ocsp/{hostile}"):
            curl(http + path, scratch=tmp_path)
        time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lines = err.read_text().splitlines()
    entries = [json.loads(line) for line in lines]   # every line parses
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert {e.get("process") for e in entries} >= {"worker-0", "worker-1", None}   # workers and supervisor
    access = [e for e in entries if e["logger"] == "iomtca.access"]
    assert any(" GET /healthz 200 " in e["message"] for e in access), access
    assert not any(line.startswith("INJECTED") for line in lines)
