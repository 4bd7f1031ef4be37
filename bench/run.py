"""`make bench` [QUICK=1]: measure, then write bench/results/latest.json and docs/BENCHMARKS.md."""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from .common import Figure

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT / "bench" / "PROFILES.md"
# The nine figures; a figure no module measures is listed as not measured.
TITLES = {
    1: "Issuance core through Authority vs raw build+sign",
    2: "EST simpleenroll over HTTPS, 8 clients, vs cfssl serve",
    3: "EST simplereenroll, new mutual-TLS connection per request, vs openssl s_time",
    4: "OCSP POST and GET, 8 clients, vs cfssl ocspserve and openssl ocsp",
    5: "CRL generation with 10k and 100k revoked entries",
    6: "Revocation latency to OCSP, /crl and retained MQTT with 100k certificates",
    7: "MQTT enrollment storm (10,000 devices) vs bare mosquitto round trips",
    8: "Reconnect storm: 10,000 devices collecting queued answers",
    9: "Resident memory of the server and the gateway with 100k devices",
}
# Each module has NUMBERS (the figures it measures) and run(work, quick) -> Figure | list[Figure].
MODULES = ["issuance", "est_figure", "ocsp_figure", "crl_figure", "revocation_figure", "mqtt_storm",
           "memory_figure"]


def _modules():
    for name in MODULES:
        try:
            yield importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"bench.{name}":
                raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes and short loads (under 2 minutes)")
    parser.add_argument("--only", type=int, action="append", help="run only this figure number (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    started = time.monotonic()
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="iomtca-bench-") as tmp:
        for module in _modules():
            if args.only and not set(module.NUMBERS) & set(args.only):
                continue
            print(f"figures {', '.join(map(str, module.NUMBERS))} ...", flush=True)
            result = module.run(Path(tmp), args.quick)
            result = result if isinstance(result, list) else [result]
            figures.extend(f for f in result if not args.only or f.number in args.only)
            for f in result:
                print(f"  {f.number}. {f.name}: ours {f.ours} {f.unit}, baseline {f.baseline} "
                      f"({f.baseline_name}), ratio {f.ratio and round(f.ratio, 2)}, met {f.met}", flush=True)
    measured = {f.number for f in figures}
    report = {"quick": args.quick, "seconds": round(time.monotonic() - started, 1),
              "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
              "figures": [f.to_json() for f in figures],
              "not_measured": {str(k): v for k, v in TITLES.items()
                                if k not in measured and (not args.only or k in args.only)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.doc.write_text(render(report))
    print(f"wrote {args.out} and {args.doc} in {report['seconds']} s")
    return 0


def render(report: dict) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`make bench QUICK=1` for the short form the test suite runs).",
        "Each figure is measured against a baseline in the same run on the same machine (2 cores, shared:",
        "absolute numbers drift, ratios less so). Load goes to 127.0.0.1 only and every load is bounded in time.",
        "",
        f"Last run: {'quick' if report['quick'] else 'full'}, {report['seconds']} s, Python "
        f"{report['machine']['python']}, {report['machine']['cpus']} CPUs.",
        "",
        "| # | figure | ours | baseline | ratio | bar | met | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in report["figures"]:
        met = {True: "yes", False: "**no**", None: "-"}[f["met"]]
        lines.append(f"| {f['number']} | {f['name']} | {f['ours']} | {f['baseline']} ({f['baseline_name']}) | "
                     f"{f['ratio']} | {f['bar']} | {met} | `{f['command']}` |")
    lines += ["", "## Notes", ""]
    for f in report["figures"]:
        if f["notes"]:
            lines.append(f"- Figure {f['number']} ({f['name']}): {f['notes']}")
    lines += ["", "## Where the bars are missed, and what would move them", ""]
    missed = [f for f in report["figures"] if f["met"] is False]
    lines += [f"- Figure {f['number']} ({f['name']}): {f['miss'] or 'no profile recorded'}" for f in missed]
    if not missed:
        lines.append("- Every figure with a bar met it in this run.")
    lines += ["", "## Not measured yet", ""]
    lines += [f"- Figure {k}: {v}" for k, v in report["not_measured"].items()] or ["- Nothing: every figure ran."]
    if PROFILES.exists():   # hand-written, kept across regenerations: where the time went, by profile
        lines += ["", "## Profiles (bench/PROFILES.md, written by hand)", ""]
        lines += PROFILES.read_text().split("\n", 1)[1].strip("\n").splitlines()   # without its own title
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
