"""Timing benchmarks; each module runs as `python -m analysis.bench.NAME` and writes docs/results/bench_NAME.md."""
