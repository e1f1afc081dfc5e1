"""Timing benchmarks; each module runs as `python -m analysis.bench.NAME` and writes docs/results/bench_NAME.md.

What they share: a stopwatch, target verdicts, the markdown report with the machine and versions named, the app
started in its own process, and SD v1.4's UNet configuration.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import diffusers
import torch
import transformers

from analysis.model import REPO_ROOT

START_TIMEOUT_S = 300
# unet/config.json and scheduler/scheduler_config.json of CompVis/stable-diffusion-v1-4 (DDIM in place of PNDM).
SD14_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, center_input_sample=False)


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


def parse_bench_args(argv, description: str, out: str, repeats_help: str,
                     add_options: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """A benchmark's command line: --repeats (default 5, the fewest for a recorded result), --out (`out`) and
    whatever `add_options` adds."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help=f"{repeats_help} (at least 5 for a recorded result)")
    parser.add_argument("--out", type=Path, default=Path(out))
    if add_options:
        add_options(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"error: --repeats must be at least 1, got {args.repeats}")
    return args


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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_ready(url: str, server: subprocess.Popen) -> None:
    """Poll `url` until it answers HTTP 200; RuntimeError if the app exits or takes longer than START_TIMEOUT_S."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the app exited with code {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the app did not answer at {url} within {START_TIMEOUT_S} s")


@contextmanager
def app_process(output=subprocess.DEVNULL, extra_args: Sequence[str] = (), env: dict | None = None) -> Iterator[str]:
    """`python app.py` (on the bundled model unless `extra_args` name another) on a free port, until the block
    ends: its URL, once it answers.

    `output`: where the app's stdout and stderr go (a file, or DEVNULL); `env`: variables added to the app's.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--device", "cpu", *extra_args],
                              cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    try:
        wait_until_ready(url, server)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
