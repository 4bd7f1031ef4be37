"""`make demo` runs end to end (the README's first command), here in a shortened form."""
from __future__ import annotations

import json
import re
import subprocess
import sys


def test_demo_runs_and_peers_see_the_revocation(tmp_path):
    data = tmp_path / "demo"
    # 30 s certificates renew at 20 s: 20 s of fleet plus 10 s of final sync sees renewals
    proc = subprocess.Popen([sys.executable, "-m", "cli.demo", "--dir", str(data), "--devices", "20",
                             "--duration", "20s", "--final-sync", "10s"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:   # the console's line comes before the fleet starts
        lines.append(line)
        if match := re.search(r"console: (https://\S+)/  log in as (\S+) / (\S+) ", line):
            break
    assert match, "".join(lines)
    url, name, password = match.groups()
    assert console_login(url, name, password, data / "ca" / "root.pem", tmp_path) == 303
    assert oct((data / "console-login.txt").stat().st_mode & 0o777) == "0o600"
    out, err = proc.communicate(timeout=240)
    stdout = "".join(lines) + out
    assert proc.returncode == 0, stdout[-3000:] + err[-3000:]
    assert "sim-00005 revoked half-way: its ward peers SAW it revoked" in stdout
    summary = json.loads((data / "summary.json").read_text())
    assert summary["devices"] == 20
    assert summary["final"]["missing"] == []
    assert summary["final"]["revoked"] == ["sim-00005"]
    assert summary["final"]["valid"] == 19
    assert summary["counts"]["enrolled"] == 20 and summary["counts"]["renewed"] > 0
    # every process the demo started is gone
    for name in ("server", "gateway", "mosquitto"):
        assert (data / "logs" / f"{name}.log").exists()
    assert str(data) not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


def console_login(url: str, name: str, password: str, root, scratch) -> int:
    """Log in to the console with curl as a browser would (the form's nonce, a cookie jar)."""
    jar = scratch / "jar"
    form = subprocess.run(["curl", "-sS", "--cacert", str(root), "-c", str(jar), f"{url}/login"],
                          capture_output=True, text=True, check=True).stdout
    nonce = re.search(r'name="nonce" value="([^"]+)"', form).group(1)
    status = subprocess.run(["curl", "-sS", "--cacert", str(root), "-b", str(jar), "-c", str(jar), "-o", "/dev/null",
                             "-w", "%{http_code}", "--data-urlencode", f"nonce={nonce}", "--data-urlencode",
                             f"name={name}", "--data-urlencode", "password@-", f"{url}/login"],
                            input=password, capture_output=True, text=True, check=True).stdout
    return int(status)


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    other = tmp_path / "precious"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    refused = subprocess.run([sys.executable, "-m", "cli.demo", "--dir", str(other)],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "not made by the demo" in refused.stderr
    assert (other / "keep.txt").exists()
