"""Timing benchmarks; each module runs as `python -m analysis.bench.NAME` and writes docs/results/bench_NAME.md.

What they share: a stopwatch, target verdicts, and the markdown report with the machine and versions named.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch
import transformers


def seconds(run: Callable[[], object]) -> float:
    synchronize()
    started = time.perf_counter()
    run()
    synchronize()
    return time.perf_counter() - started


def synchronize() -> None:
    """Wait for queued GPU work, so a stopwatch measures the work and not its launch."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def verdict(value: float, target: float, unit: str = "") -> str:
    return f"≤ {target:g}{unit}: {'met' if value <= target else 'NOT met'}"


def write_report(path: Path, title: str, command: str, setup: str, rows: list[tuple[str, str, str]],
                 details: str, load_before: float, load_after: float,
                 headers: tuple[str, str, str] = ("what", "median", "target")) -> None:
    """Print the table and write the report: what ran, the table, every run, the machine and versions."""
    table = "\n".join([f"| {' | '.join(headers)} |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows])
    report = f"""# {title}

Written by `{command}` on {datetime.date.today().isoformat()}.
{setup}

{table}

{details}

Machine: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()},
1-minute load average {load_before:.2f} before and {load_after:.2f} after the timed runs.
Versions: Python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__},
transformers {transformers.__version__}.
"""
    print("\n" + table)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report)
    print(f"\nwrote {path}")
