"""What Gradio's queue polling costs the app: its CPU use while idle, and the Perturb view's search through it.

Gradio's queue looks for a new event every 1 ms and for progress to send every 10 ms; the app sets 50 ms and
100 ms (`dori_ui.app.QUEUE_POLL_S`, `PROGRESS_POLL_S`). One app on the bundled model, served in a fresh process
prepared as `python app.py` prepares it, alternates the two settings `--repeats` times each: the process's CPU
time over 10 s of idling (in seconds of CPU per second), then the Perturb view's default search through
`gradio_client` (`/perturb`). The client runs in the same process, the same for both settings.

    python -m analysis.bench.queue_polling --repeats 5
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from analysis.bench import parse_bench_args, write_report

IDLE_SECONDS = 10.0
SETTINGS = {"gradio": "Gradio's own polling (1 ms events, 10 ms progress)",
            "app": "the app's polling (`QUEUE_POLL_S`, `PROGRESS_POLL_S`)"}

CASE_SCRIPT = """
import sys
from analysis.worker_threads import prepare_for_worker_threads
prepare_for_worker_threads()
from analysis.bench.queue_polling import run_cases
run_cases(int(sys.argv[1]))
"""


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def run_cases(repeats: int) -> None:
    """Print {setting: {"idle": [...], "search": [...]}} as JSON, the settings alternating (run by `CASE_SCRIPT`,
    which prepares the process before torch loads)."""
    import gradio as gr
    from gradio_client import Client

    from analysis.bench import free_port
    from analysis.model import open_model
    from dori_ui.app import PROGRESS_POLL_S, QUEUE_POLL_S, build_app, launch_options, set_queue_polling

    with gr.Blocks() as defaults:
        pass
    gradio_queue = defaults.queue()._queue
    polling = {"gradio": (gradio_queue.sleep_when_free, gradio_queue.progress_update_sleep_when_free),
               "app": (QUEUE_POLL_S, PROGRESS_POLL_S)}
    app = build_app(open_model(None, device="cpu", dtype="float32"))
    port = free_port()
    app.launch(server_port=port, prevent_thread_lock=True, **launch_options())
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        found = {setting: {"idle": [], "search": []} for setting in SETTINGS}
        for _ in range(repeats):
            for setting in SETTINGS:
                set_queue_polling(app, *polling[setting])
                started = cpu_seconds()
                time.sleep(IDLE_SECONDS)
                found[setting]["idle"].append((cpu_seconds() - started) / IDLE_SECONDS)
                started = time.perf_counter()
                client.predict(upload_path=None, api_name="/perturb")
                found[setting]["search"].append(time.perf_counter() - started)
    finally:
        app.close()
    print(json.dumps(found))


def main(argv=None) -> None:
    args = parse_bench_args(argv, __doc__, "docs/results/bench_queue_polling.md", "searches per setting")
    load_before = os.getloadavg()[0]
    output = subprocess.run([sys.executable, "-c", CASE_SCRIPT, str(args.repeats)], capture_output=True, text=True,
                            check=True).stdout
    found = json.loads(output.splitlines()[-1])
    load_after = os.getloadavg()[0]
    rows = []
    for setting, label in SETTINGS.items():
        rows.append((f"{label}: idle app, CPU seconds per second", f"{statistics.median(found[setting]['idle']):.3f}",
                     ""))
        rows.append((f"{label}: Dori search from the Perturb view (`/perturb`)",
                     f"{statistics.median(found[setting]['search']):.2f} s", ""))
    write_report(args.out, "Gradio's queue polling and the app", f"python -m analysis.bench.queue_polling --repeats "
                 f"{args.repeats}", "The bundled model, float32 on CPU; one app process, prepared as `python app.py` "
                 "does, the two settings alternating; the Perturb view's defaults (50 search steps, batch 8, "
                 "previews and a 4-seed evaluation).", rows,
                 "Every run: " + "; ".join(f"{setting} idle {[round(v, 3) for v in runs['idle']]}, search "
                                           f"{[round(v, 2) for v in runs['search']]} s"
                                           for setting, runs in found.items()) + ".",
                 load_before, load_after)


if __name__ == "__main__":
    main()
