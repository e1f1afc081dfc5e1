"""Where the repository's own files are: the bundled model, the shipped lists and caches live under it."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
