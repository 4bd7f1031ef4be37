"""Counters, errors by code and latency percentiles of a fleet run; the summary table and JSON."""
from __future__ import annotations

import json
import math
from collections import Counter, defaultdict


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = max(0, math.ceil(q / 100 * len(ordered)) - 1)
    return ordered[index]


class Stats:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.latency: dict[str, list[float]] = defaultdict(list)

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def error(self, code: str) -> None:
        self.errors[code] += 1

    def timed(self, op: str, seconds: float) -> None:
        self.latency[op].append(seconds)

    def latency_table(self) -> dict[str, dict[str, float]]:
        return {op: {"n": len(v), "p50_ms": round(percentile(v, 50) * 1000, 1),
                     "p95_ms": round(percentile(v, 95) * 1000, 1), "p99_ms": round(percentile(v, 99) * 1000, 1)}
                for op, v in sorted(self.latency.items())}


def render(summary: dict) -> str:
    lines = [f"fleet: {summary['devices']} devices ({summary['transport']}), {summary['duration_s']:.0f} s, "
             f"seed {summary['seed']}"]
    lines.append("  " + "  ".join(f"{k}={v}" for k, v in sorted(summary["counts"].items())))
    final = summary["final"]
    lines.append(f"  end: {final['valid']} with a valid certificate, {len(final['revoked'])} revoked, "
                 f"{len(final['stranded'])} stranded past the grace period (need a new token), "
                 f"{len(final['missing'])} MISSING a certificate they should have")
    if summary["errors"]:
        lines.append("  errors by code: " + ", ".join(f"{k}={v}" for k, v in sorted(summary["errors"].items())))
    lines.append(f"  {'operation':<16}{'n':>7}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}")
    for op, row in summary["latency"].items():
        lines.append(f"  {op:<16}{row['n']:>7}{row['p50_ms']:>10}{row['p95_ms']:>10}{row['p99_ms']:>10}")
    if final["missing"]:
        lines.append("  missing: " + ", ".join(final["missing"][:20]))
    return "\n".join(lines)


def dump(summary: dict) -> str:
    return json.dumps(summary, indent=2, sort_keys=True, default=str)
