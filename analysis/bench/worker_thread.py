"""The Perturb view's default Dori search on the bundled model, as the app runs it: in a worker thread.

Three cases, each in a fresh process (the settings must come before torch loads), timed `--repeats` times each:
the search in the main thread (as the command line runs it); in a worker thread after a parallel op in the main
thread (as the app leaves its threads); the same with `analysis.worker_threads.prepare_for_worker_threads`
(what `python app.py` does).

    python -m analysis.bench.worker_thread --repeats 5
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading

import torch

from analysis.bench import parse_bench_args, seconds, write_report
from analysis.model import load_model
from analysis.tasks import run_task

CASES = {"main": "the search in the main thread (the command line)",
         "worker": "in a worker thread, after a parallel op in the main thread (the app's threads, default settings)",
         "prepared": "the same, after `prepare_for_worker_threads` (what `python app.py` does)"}
# The Perturb view's defaults, as its export records them (docs/results/bench_startup.md times them in the app).
SEARCH = dict(image=0, starts=[{"kind": "random", "seed": 0}], evaluation_seeds=[0, 1, 2, 3], preview_every=25,
              search=dict(steps=50, batch_size=8))

CASE_SCRIPT = """
import sys
case, repeats = sys.argv[1], int(sys.argv[2])
if case == "prepared":
    from analysis.worker_threads import prepare_for_worker_threads
    prepare_for_worker_threads()
from analysis.bench.worker_thread import run_case
run_case(case, repeats)
"""


def run_case(case: str, repeats: int) -> None:
    """Print the seconds of `repeats` searches in this process, as JSON (run by `CASE_SCRIPT`, which applies the
    settings before this module loads torch)."""
    handle = load_model()
    config = dict(SEARCH, steps=handle.default_steps, guidance=handle.default_guidance)
    times: list[float] = []

    def search() -> None:
        times.append(seconds(lambda: run_task(handle, "attack", config)))

    if case != "main":
        torch.randn(512, 512) @ torch.randn(512, 512)  # the main thread's own OpenMP team, as the app's has
    for _ in range(repeats):
        if case == "main":
            search()
        else:
            worker = threading.Thread(target=search)
            worker.start()
            worker.join()
    print(json.dumps(times))


def main(argv=None) -> None:
    args = parse_bench_args(argv, __doc__, "docs/results/bench_worker_thread.md",
                            "searches per case, each case in its own process")
    environment = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                                                    "MALLOC_ARENA_MAX")}
    load_before = os.getloadavg()[0]
    times = {case: json.loads(subprocess.run([sys.executable, "-c", CASE_SCRIPT, case, str(args.repeats)],
                                             env=environment, capture_output=True, text=True,
                                             check=True).stdout.splitlines()[-1])
             for case in CASES}
    load_after = os.getloadavg()[0]
    rows = [(CASES[case], f"{statistics.median(found):.2f} s", "") for case, found in times.items()]
    write_report(args.out, "Torch in the app's worker threads", f"python -m analysis.bench.worker_thread --repeats "
                 f"{args.repeats}", "The Perturb view's default search (50 steps, batch 8, its previews and 4-seed "
                 "evaluation) on the bundled model, float32 on CPU; each case in a fresh process.", rows,
                 "Every run, in seconds: " + ", ".join(f"{case} {[round(t, 2) for t in found]}"
                                                       for case, found in times.items()) + ".",
                 load_before, load_after)


if __name__ == "__main__":
    main()
