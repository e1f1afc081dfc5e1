"""Write the caches shipped with the bundled model (`analysis.paths.SHIPPED_CACHE_DIR`, assets/demo_model/cache/).

    python -m analysis.experiments.cache_assets

The first runs of some views compute what depends only on the model and its reference prompts, and cache it
(`analysis.localize.cached`): the detectors' reference distributions (the Replicate view's Wen band, the Inside
view), NeMo's reference statistics and threshold, Wanda's reference norms, and the Fine-tune view's normal pairs.
NeMo also caches each prompt's mask: those of the bundled model's memorized captions at the Mitigate view's defaults
are shipped too, so that the view's NeMo answers without its minute of criterion checks. This runs those analyses
with the views' default settings on the bundled model, in an empty runs folder, and ships what they cached; `cached`
reads a shipped file when the runs folder has none. Rerun it when the bundled model or one of those defaults
changes: tests/test_shipped_cache.py fails until then.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from analysis.paths import SHIPPED_CACHE_DIR

# The Mitigate view's default localizer seeds; its NeMo refines by default.
LOCALIZER_SEEDS = [0, 1, 2, 3]
NEMO_REFINE = True

FIRST_RUNS_SCRIPT = """
from analysis.experiments.cache_assets import first_runs
first_runs()
"""


def first_runs() -> None:
    """The analyses whose first run caches something, with the views' defaults, on the bundled model (run in a
    process whose DORI_RUNS_DIR is empty)."""
    from analysis.model import load_model
    from analysis.normal import generated_pairs
    from analysis.tasks import run_task

    handle = load_model()
    steps = handle.default_steps
    run_task(handle, "reference", dict(steps=steps, guidance=handle.default_guidance))
    # Wanda caches its reference norms; NeMo its statistics and threshold, then each caption's mask.
    localized = [("wanda", 0, dict(steps=steps))] + [("nemo", index, dict(steps=steps, refine=NEMO_REFINE))
                                                     for index in range(len(handle.memorized))]
    for method, index, parameters in localized:
        run_task(handle, "localize", dict(image=index, prompt=handle.memorized[index].caption, method=method,
                                          parameters=parameters, seeds=LOCALIZER_SEEDS, evaluation_seeds=[0]))
    generated_pairs(handle)


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    # Emptied first: `cached` would read the files shipped before instead of computing them.
    shutil.rmtree(SHIPPED_CACHE_DIR, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="dori-runs-") as runs:
        subprocess.run([sys.executable, "-c", FIRST_RUNS_SCRIPT], env={**os.environ, "DORI_RUNS_DIR": runs},
                       check=True)
        written = sorted((Path(runs) / "localize_cache").glob("*.safetensors"))
        SHIPPED_CACHE_DIR.mkdir(parents=True)
        for path in written:
            shutil.copy(path, SHIPPED_CACHE_DIR / path.name)
    print(f"wrote {len(written)} files to {SHIPPED_CACHE_DIR}: " + ", ".join(path.name for path in written))


if __name__ == "__main__":
    main()
