"""Process settings for running torch in worker threads on the CPU; `python app.py` applies them before torch loads.

The app runs every computation in a worker thread (`dori_ui.streaming`), not in the main thread as the command
line does. On glibc and libgomp (Linux) two process-wide defaults then slow torch on the CPU (measured by
`python -m analysis.bench.worker_thread`, docs/results/bench_worker_thread.md):

- glibc gives each thread its own malloc arena, whose heaps it trims and refills for every large tensor;
- each thread that runs a parallel torch op gets its own OpenMP team. Once the teams hold more threads than
  there are cores, libgomp makes idle workers sleep almost at once, so every parallel op waits to wake one.

Both are read when the C libraries start, so they must be set before torch is imported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# libgomp's own spin before an idle worker sleeps; it drops to 1,000 spins when teams outnumber the cores.
OPENMP_SETTINGS = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}
M_ARENA_MAX = -8  # glibc's malloc.h


def prepare_for_worker_threads() -> bool:
    """Threads allocate from glibc's main arena, and OpenMP keeps its usual spin however many teams there are
    (a setting already in the environment is kept). Call before torch is imported and before any thread starts.
    Returns whether the malloc setting took (False where the C library has no `mallopt`: macOS, Windows)."""
    for name, value in OPENMP_SETTINGS.items():
        os.environ.setdefault(name, value)
    library = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(library), "mallopt", None) if library else None
    return mallopt is not None and mallopt(M_ARENA_MAX, 1) == 1
