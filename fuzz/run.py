"""`make fuzz`: every target under atheris for a bounded time, then a report.

    python -m fuzz.run [--seconds 60 | --runs N] [--only TARGET ...] [--together] [--out DIR]

Each target starts from fresh valid inputs (fuzz/seeds.py) plus the regression corpus that
tests/fuzz replays (tests/fuzz/corpus/TARGET/). A finding is written to DIR/findings/TARGET/; to
keep it as a regression, copy it into tests/fuzz/corpus/TARGET/ with the fix. Exit status 1 if
any target found something. `IOMTCA_FUZZ_SECONDS` sets the default time per target.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .seeds import seeds
from .targets import TARGETS, check

ROOT = Path(__file__).resolve().parent.parent
REGRESSION = ROOT / "tests" / "fuzz" / "corpus"
_RUNS = re.compile(r"Done (\d+) runs in (\d+) second")
_PROGRESS = re.compile(r"^#(\d+)\s", re.M)


def fuzz_one(name: str, seconds: int, work: Path, seed_inputs: list[bytes], runs: int | None = None) -> dict:
    corpus, findings = work / "corpus" / name, work / "findings" / name
    corpus.mkdir(parents=True, exist_ok=True)
    findings.mkdir(parents=True, exist_ok=True)
    for data in seed_inputs + regressions(name):
        (corpus / hashlib.sha1(data).hexdigest()).write_bytes(data)
    limit = f"-runs={runs}" if runs is not None else f"-max_total_time={seconds}"
    argv = [sys.executable, "-m", "fuzz.worker", name, limit, "-timeout=20",
            "-rss_limit_mb=3072", "-max_len=16384", f"-artifact_prefix={findings}/", "-print_final_stats=1",
            str(corpus)]
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=seconds * 3 + 120)
    log = proc.stdout + proc.stderr
    (work / f"{name}.log").write_text(log)
    done = _RUNS.search(log)
    runs = int(done.group(1)) if done else max((int(n) for n in _PROGRESS.findall(log)), default=0)
    found = sorted(p.name for p in findings.iterdir())
    for path in sorted(findings.iterdir()):
        log += f"\n{path.name}: {replay(name, path.read_bytes())}"
    return {"target": name, "runs": runs, "seconds": round(time.monotonic() - started, 1),
            "corpus": len(list(corpus.iterdir())), "findings": found, "exit": proc.returncode,
            "tail": "" if proc.returncode == 0 and not found else log[-1500:]}


def regressions(name: str) -> list[bytes]:
    if name == "all":
        return [bytes([i]) + data for i, target in enumerate(TARGETS) for data in regressions(target)]
    return [p.read_bytes() for p in sorted((REGRESSION / name).glob("*")) if p.is_file()]


def replay(name: str, data: bytes) -> str:
    """What a finding raises, replayed here without atheris (its tracebacks name the cause)."""
    try:
        if name == "all":
            check(list(TARGETS.values())[data[0] % len(TARGETS)], data[1:]) if data else None
        else:
            check(TARGETS[name], data)
    except BaseException as exc:   # noqa: BLE001 - the point is to show it
        frames = traceback.extract_tb(exc.__traceback__)[-3:]
        return f"{type(exc).__name__}: {exc} at " + " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
    return "passes when replayed (fixed; or the fuzzer hit a time or memory limit)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("IOMTCA_FUZZ_SECONDS", "60")))
    parser.add_argument("--only", action="append", choices=sorted(TARGETS))
    parser.add_argument("--together", action="store_true",
                        help="all targets in one process, the first byte of an input picking the target (quick)")
    parser.add_argument("--runs", type=int, help="stop after this many inputs instead of --seconds")
    parser.add_argument("--out", type=Path, help="where corpora, findings and logs go (default: a temporary directory)")
    args = parser.parse_args(argv)
    work = args.out or Path(tempfile.mkdtemp(prefix="iomtca-fuzz-"))
    names = args.only or list(TARGETS)
    initial = seeds()
    if args.together:
        initial["all"] = [bytes([list(TARGETS).index(n)]) + data for n in names for data in initial[n]]
        names = ["all"]
    results = []
    for name in names:
        result = fuzz_one(name, args.seconds, work, initial[name], args.runs)
        results.append(result)
        status = "ok" if result["exit"] == 0 and not result["findings"] else f"FINDING {result['findings']}"
        print(f"{name:24} {result['runs']:>9,} runs in {result['seconds']:>6.1f} s, corpus {result['corpus']:>5}: {status}",
              flush=True)
        if result["tail"]:
            print(result["tail"], file=sys.stderr)
    total = sum(r["runs"] for r in results)
    bad = [r["target"] for r in results if r["exit"] != 0 or r["findings"]]
    print(f"{len(results)} targets, {total:,} executions; findings in: {', '.join(bad) or 'none'} (work: {work})")
    if args.out is None and not bad:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
