"""How long does the app take to start, to show its first replication gallery, and to answer what users feel?

    python -m analysis.bench.startup [--repeats 5] [--out docs/results/bench_startup.md]

Each repeat starts `python app.py --port P` on the bundled model in a fresh
process and times (a) from the process start until the page answers HTTP 200
(target: at most 15 s) and (b) the first 4-seed replication gallery through
`gradio_client` until it is shown (the view's first output; the Wen curve's reference band follows), the app's
`/replicate` endpoint with the model's default steps
and guidance (target: at most 3 s). The client connects before (b) is timed.
Then, through the same client and with the views' own defaults (read from the app's API): (c) a Dori search
from the Perturb view (`/perturb`, 50 steps), (d) the first UMAP trigger map of the shipped set
(`/trigger_map_prepare` as picking UMAP does, then `/trigger_map_load` at once; target: at most 5 s), and (e)
NeMo's and Wanda's first mitigation of the first caption in the Mitigate view (`/mitigate`; NeMo's target: at most
3 s, its masks shipped). Once the app is
closed, the search's export is run again in the benchmark's own process (`run_task`, same configuration: the
search, its previews and its evaluation): what the app adds to the engine is the difference.

Every app process gets an empty runs folder (`DORI_RUNS_DIR`: no cached map, statistics or reference activations
but those shipped with the bundled model, `assets/demo_model/cache/`),
and the benchmark one numba cache folder of its own (`NUMBA_CACHE_DIR`), empty at the start: the first repeat is a
fresh install, the later ones are later starts on the same machine.

Run it on a quiet machine: other processes on the cores change the numbers.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from analysis.bench import app_process, parse_bench_args, seconds, verdict, write_report
from analysis.export import load_export
from analysis.model import ModelHandle, load_model
from analysis.tasks import run_task

SEEDS = 4
START_SECONDS_TARGET = 15.0
GALLERY_SECONDS_TARGET = 3.0
FIRST_UMAP_SECONDS_TARGET = 5.0
FIRST_NEMO_SECONDS_TARGET = 3.0


def first_output(job) -> object:
    """What a streaming view shows first (the gallery; the Replicate view's reference band follows)."""
    return next(iter(job))


def one_start(handle: ModelHandle, numba_cache: str) -> tuple[float, ...]:
    """Seconds to HTTP 200, for the first gallery, for the Perturb view's default search, for the first UMAP map
    and for NeMo's and Wanda's first mitigation, of one fresh app process with an empty runs folder; then for the
    same search run in this process."""
    from gradio_client import Client

    with tempfile.TemporaryDirectory(prefix="dori-runs-") as runs:
        started = time.perf_counter()
        with app_process(env={"DORI_RUNS_DIR": runs, "NUMBA_CACHE_DIR": numba_cache}) as url:
            ready = time.perf_counter() - started
            client = Client(url, verbose=False)
            prompt = handle.memorized[0].caption
            job = client.submit(prompt, SEEDS, 0, handle.default_steps, handle.default_guidance, api_name="/replicate")
            gallery = seconds(lambda: first_output(job))
            band = gallery + seconds(job.result)  # the Wen curve's reference band, computed on a fresh install
            # Every other setting keeps the view's default (gradio_client fills them in).
            search = seconds(lambda: client.predict(upload_path=None, api_name="/perturb"))
            search_record = load_export(client.predict(api_name="/export_perturb"))
            client.predict("umap", api_name="/trigger_map_prepare")
            first_map = seconds(lambda: client.predict(method_name="umap", api_name="/trigger_map_load"))
            nemo, wanda = (seconds(lambda: client.predict(prompt_text=prompt, method_label=label, api_name="/mitigate"))
                           for label in ("NeMo (neurons)", "Wanda (weights)"))
        engine_search = seconds(lambda: run_task(handle, search_record.kind, search_record.config,
                                                 inputs=search_record.inputs()))
    return ready, gallery, band, search, engine_search, first_map, nemo, wanda


def main(argv=None) -> None:
    args = parse_bench_args(argv, __doc__, "docs/results/bench_startup.md", "app starts")
    # The prompt and settings the app starts with, and the engine's run of the app's search.
    handle = load_model()
    prompt, steps, guidance = handle.memorized[0].caption, handle.default_steps, handle.default_guidance

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="dori-numba-") as numba_cache:
        runs = [one_start(handle, numba_cache) for _ in range(args.repeats)]
    load_after = os.getloadavg()[0]
    ready_s, gallery_s, band_s, search_s, engine_search_s, map_s, nemo_s, wanda_s = (
        list(column) for column in zip(*runs))
    ready_median, gallery_median = statistics.median(ready_s), statistics.median(gallery_s)
    search_median = statistics.median(search_s)
    rows = [("`python app.py` to HTTP 200", f"{ready_median:.2f} s", verdict(ready_median, START_SECONDS_TARGET, " s")),
            (f"first {SEEDS}-seed gallery (`/replicate` via gradio_client)", f"{gallery_median:.2f} s",
             verdict(gallery_median, GALLERY_SECONDS_TARGET, " s")),
            ("the gallery's Wen curve with its reference band (its distributions shipped with the bundled model)",
             f"{statistics.median(band_s):.2f} s", ""),
            ("Dori search from the Perturb view, its defaults (`/perturb`)", f"{search_median:.2f} s", ""),
            ("the same search, previews and evaluation run by `run_task` in one process",
             f"{statistics.median(engine_search_s):.2f} s", ""),
            ("first UMAP map of the shipped set (`/trigger_map_load`), fresh install (first run)",
             f"{map_s[0]:.2f} s", verdict(map_s[0], FIRST_UMAP_SECONDS_TARGET, " s")),
            ("first UMAP map of the shipped set, later starts (median of the other runs)",
             f"{statistics.median(map_s[1:]):.2f} s" if len(map_s) > 1 else "not run",
             verdict(statistics.median(map_s[1:]), FIRST_UMAP_SECONDS_TARGET, " s") if len(map_s) > 1 else ""),
            ("NeMo's first mitigation of the caption (`/mitigate`), its defaults (its masks shipped)",
             f"{statistics.median(nemo_s):.2f} s", verdict(statistics.median(nemo_s), FIRST_NEMO_SECONDS_TARGET, " s")),
            ("Wanda's first mitigation of the caption (`/mitigate`), its defaults",
             f"{statistics.median(wanda_s):.2f} s", "")]
    write_report(
        args.out, "App start and first gallery on the bundled model",
        f"python -m analysis.bench.startup --repeats {args.repeats}",
        f"Prompt “{prompt}”, {SEEDS} seeds, DDIM {steps} steps, guidance {guidance}, float32 on CPU.\n"
        f"Medians of {args.repeats} fresh app processes; each is timed from process start to the first HTTP 200, "
        "then the connected client asks for one gallery, one Dori search, one UMAP map and NeMo's and Wanda's "
        "mitigation. Each process starts with an empty runs folder; the numba cache starts empty for the first.",
        rows,
        f"Every run, in seconds: start {[round(s, 2) for s in ready_s]}, gallery {[round(s, 2) for s in gallery_s]}, "
        f"band {[round(s, 2) for s in band_s]}, "
        f"search {[round(s, 2) for s in search_s]}, same search in-process {[round(s, 2) for s in engine_search_s]}, "
        f"first UMAP map {[round(s, 2) for s in map_s]}, "
        f"NeMo {[round(s, 2) for s in nemo_s]}, Wanda {[round(s, 2) for s in wanda_s]}.",
        load_before, load_after)


if __name__ == "__main__":
    main()
