"""`python -m fuzz.wire` in the suite: a few hundred seeded mutated requests against a real
`iomtca serve` (every listener, raw HTTP framing included), 0 5xx, 0 tracebacks and 0 ERROR lines
in its log, and a real enrollment afterwards. `make fuzz` sends 100,000."""
from __future__ import annotations

import re
import subprocess
import sys


def test_seeded_wire_run_gets_no_5xx_and_leaves_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "fuzz.wire", "--requests", "600", "--seed", "7"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = re.search(r"5xx: (\d+); tracebacks in the server log: (\d+); ERROR lines: (\d+); "
                        r"a real enrollment afterwards: (\d+)", proc.stdout)
    assert summary and summary.groups() == ("0", "0", "0", "200"), proc.stdout
    sent = re.search(r"^([\d,]+) requests \(seed 7\)", proc.stdout, re.M)
    assert sent and int(sent.group(1).replace(",", "")) == 600, proc.stdout
    # the run reached the CA (issued), refused input (4xx) and the parser (raw framing)
    assert " 200: " in proc.stdout and " 400: " in proc.stdout, proc.stdout
