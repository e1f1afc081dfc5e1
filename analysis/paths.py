"""Where the repository's own files are (the bundled model, the shipped lists) and where runs and caches go."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Caches, built trigger sets and fine-tuned models. DORI_RUNS_DIR moves them, e.g. off a read-only install, or to an
# empty folder to time a fresh install.
RUNS_DIR = Path(os.environ.get("DORI_RUNS_DIR", REPO_ROOT / "runs"))
# What the bundled model's first runs compute once (reference distributions, statistics, thresholds), shipped so that
# a fresh install does not wait for them; `python -m analysis.experiments.cache_assets` writes them.
SHIPPED_CACHE_DIR = REPO_ROOT / "assets" / "demo_model" / "cache"
