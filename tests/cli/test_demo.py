"""`make demo` runs end to end (it is what the README promises first)."""
from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_shows_revocation(tmp_path):
    data = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "cli.demo", "--dir", str(data)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "vent-0004.pem: revoked" in proc.stdout and "Reason: cessationOfOperation" in proc.stdout
    assert "pump-0001.pem: good" in proc.stdout
    assert "audit log intact" in proc.stdout
    # a second run replaces its own folder; a folder it did not make is refused
    assert subprocess.run([sys.executable, "-m", "cli.demo", "--dir", str(data)],
                          capture_output=True, timeout=300).returncode == 0
    other = tmp_path / "precious"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    refused = subprocess.run([sys.executable, "-m", "cli.demo", "--dir", str(other)],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and (other / "keep.txt").exists()
