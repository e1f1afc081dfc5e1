"""Write the caches shipped with the bundled model (`analysis.paths.SHIPPED_CACHE_DIR`, assets/demo_model/cache/).

    python -m analysis.experiments.cache_assets

The first runs of some views compute what depends only on the model and its reference prompts, and cache it
(`analysis.localize.cached`): the detectors' reference distributions (the Replicate view's Wen band, the Inside
view), NeMo's reference statistics and threshold, Wanda's reference norms, and the Fine-tune view's normal pairs.
This runs those analyses with the views' default settings on the bundled model, in an empty runs folder, and ships
what they cached; `cached` reads a shipped file when the runs folder has none. Rerun it when the bundled model or
one of those defaults changes: tests/test_shipped_cache.py fails until then.
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

# The Mitigate view's default localizer seeds.
LOCALIZER_SEEDS = [0, 1, 2, 3]

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
    steps, caption = handle.default_steps, handle.memorized[0].caption
    run_task(handle, "reference", dict(steps=steps, guidance=handle.default_guidance))
    # NeMo's statistics and threshold come before its per-prompt refinement, which caches nothing.
    for method, parameters in (("nemo", dict(steps=steps, refine=False)), ("wanda", dict(steps=steps))):
        run_task(handle, "localize", dict(image=0, prompt=caption, method=method, parameters=parameters,
                                          seeds=LOCALIZER_SEEDS, evaluation_seeds=[0]))
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
