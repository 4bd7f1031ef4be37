"""`make bench QUICK=1` works: every figure is measured and written. It asserts no speed."""
from __future__ import annotations

import json
import subprocess
import sys

ALL_FIGURES = set(range(1, 10))


def test_quick_bench_writes_results_and_table(tmp_path):
    out, doc = tmp_path / "latest.json", tmp_path / "BENCHMARKS.md"
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(out), "--doc", str(doc)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True
    assert {f["number"] for f in report["figures"]} == ALL_FIGURES
    assert report["not_measured"] == {}
    for figure in report["figures"]:
        assert figure["ours"] is not None and figure["ours"] > 0, figure
        assert figure["met"] in (True, False, None), figure
        if figure["baseline"] is not None:
            assert figure["ratio"] == round(figure["ours"] / figure["baseline"], 3)
        if figure["met"] is False:  # a missed bar says where the time goes
            assert figure["miss"], figure
    table = doc.read_text()
    assert "| # | figure | ours | baseline | ratio |" in table
    assert all(f"| {n} |" in table for n in ALL_FIGURES)
    # every process the harness started is gone (openssl's responder runs in its own namespace)
    leftover = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "iomtca-bench-" not in leftover, leftover


def test_batch_cpu_smoke():
    """`python -m bench.batch_cpu` (bench/PROFILES.md) runs: every item issued with its OCSP response."""
    proc = subprocess.run([sys.executable, "-m", "bench.batch_cpu", "64"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.startswith("64 batch items: ") and "ms CPU per item" in proc.stdout, proc.stdout
