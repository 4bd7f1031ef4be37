"""`make demo` runs end to end (the README's first command), here in a shortened form."""
from __future__ import annotations

import json
import subprocess
import sys


def test_demo_runs_and_peers_see_the_revocation(tmp_path):
    data = tmp_path / "demo"
    # 30 s certificates renew at 20 s: 20 s of fleet plus 10 s of final sync sees renewals
    proc = subprocess.run([sys.executable, "-m", "cli.demo", "--dir", str(data), "--devices", "20",
                           "--duration", "20s", "--final-sync", "10s"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sim-00005 revoked half-way: its ward peers SAW it revoked" in proc.stdout
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


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    other = tmp_path / "precious"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    refused = subprocess.run([sys.executable, "-m", "cli.demo", "--dir", str(other)],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "not made by the demo" in refused.stderr
    assert (other / "keep.txt").exists()
