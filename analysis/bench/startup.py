"""How long does the app take to start, to show its first replication gallery, and to answer what users feel?

    python -m analysis.bench.startup [--repeats 5] [--out docs/results/bench_startup.md]

Each repeat starts `python app.py --port P` on the bundled model in a fresh
process and times (a) from the process start until the page answers HTTP 200
(target: at most 15 s) and (b) the first 4-seed replication gallery through
`gradio_client`, the app's `/replicate` endpoint with the model's default steps
and guidance (target: at most 3 s). The client connects before (b) is timed.
Then, through the same client and with the views' own defaults (read from the app's API): (c) a Dori search
from the Perturb view (`/perturb`, 50 steps) and (d) the first UMAP trigger map of the shipped set
(`/trigger_map_prepare` as picking UMAP does, then `/trigger_map_load` at once; target: at most 5 s).

Run it on a quiet machine: other processes on the cores change the numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from analysis.bench import app_process, seconds, verdict, write_report
from analysis.model import load_model

SEEDS = 4
START_SECONDS_TARGET = 15.0
GALLERY_SECONDS_TARGET = 3.0
FIRST_UMAP_SECONDS_TARGET = 5.0


def one_start(prompt: str, steps: int, guidance: float) -> tuple[float, float, float, float]:
    """Seconds to HTTP 200, for the first gallery, for the Perturb view's default search and for the first UMAP
    map, of one fresh app process."""
    from gradio_client import Client

    started = time.perf_counter()
    with app_process() as url:
        ready = time.perf_counter() - started
        client = Client(url, verbose=False)
        gallery = seconds(lambda: client.predict(prompt, SEEDS, 0, steps, guidance, api_name="/replicate"))
        # Every other setting keeps the view's default (gradio_client fills them in).
        search = seconds(lambda: client.predict(upload_path=None, api_name="/perturb"))
        client.predict("umap", api_name="/trigger_map_prepare")
        first_map = seconds(lambda: client.predict(method_name="umap", api_name="/trigger_map_load"))
    return ready, gallery, search, first_map


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="app starts (at least 5 for a recorded result)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/bench_startup.md"))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"error: --repeats must be at least 1, got {args.repeats}")
    # Only to read the prompt and settings the app starts with; the timed runs load their own.
    handle = load_model()
    prompt, steps, guidance = handle.memorized[0].caption, handle.default_steps, handle.default_guidance
    del handle

    load_before = os.getloadavg()[0]
    runs = [one_start(prompt, steps, guidance) for _ in range(args.repeats)]
    load_after = os.getloadavg()[0]
    ready_s, gallery_s, search_s, map_s = (list(column) for column in zip(*runs))
    ready_median, gallery_median = statistics.median(ready_s), statistics.median(gallery_s)
    search_median = statistics.median(search_s)
    rows = [("`python app.py` to HTTP 200", f"{ready_median:.2f} s", verdict(ready_median, START_SECONDS_TARGET, " s")),
            (f"first {SEEDS}-seed gallery (`/replicate` via gradio_client)", f"{gallery_median:.2f} s",
             verdict(gallery_median, GALLERY_SECONDS_TARGET, " s")),
            ("Dori search from the Perturb view, its defaults (`/perturb`)", f"{search_median:.2f} s", ""),
            # A map is cached on disk once computed, so only the slowest run shows the first map of a new install.
            ("first UMAP map of the shipped set (`/trigger_map_load`), slowest run", f"{max(map_s):.2f} s",
             verdict(max(map_s), FIRST_UMAP_SECONDS_TARGET, " s"))]
    write_report(
        args.out, "App start and first gallery on the bundled model",
        f"python -m analysis.bench.startup --repeats {args.repeats}",
        f"Prompt “{prompt}”, {SEEDS} seeds, DDIM {steps} steps, guidance {guidance}, float32 on CPU.\n"
        f"Medians of {args.repeats} fresh app processes; each is timed from process start to the first HTTP 200, "
        "then the connected client asks for one gallery, one Dori search and one UMAP map.",
        rows,
        f"Every run, in seconds: start {[round(s, 2) for s in ready_s]}, gallery {[round(s, 2) for s in gallery_s]}, "
        f"search {[round(s, 2) for s in search_s]}, first UMAP map {[round(s, 2) for s in map_s]}.",
        load_before, load_after)


if __name__ == "__main__":
    main()
