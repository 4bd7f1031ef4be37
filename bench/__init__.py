"""`make bench`: figures measured against baselines in the same run (see docs/BENCHMARKS.md)."""
