"""Run an export again: `dori rerun` and the tests' check that every view's numbers reproduce.

    recorded, reproduced = rerun("replicate.zip")
    mismatches = [row for row in compare_metrics(recorded.metrics, reproduced.metrics) if not row["match"]]

An export comes from elsewhere and is not trusted: see `rerun`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from analysis.export import RunRecord, load_export
from analysis.model import open_model
from analysis.progress import Callback
from analysis.task_settings import BUNDLED_MODEL_NAME, check_limits
from analysis.tasks import TASKS, run_task


def rerun(path: str | Path, device: str | torch.device = "cpu", model: str | None = None,
          out_dir: str | Path | None = None, memorized: str | Path | None = None,
          reference_prompts: str | Path | None = None, sscd: str | Path | None = None,
          sscd_threshold: float | None = None, normal: str | Path | None = None,
          callback: Callback | None = None) -> tuple[RunRecord, RunRecord]:
    """Load an export, load its model (on `device`, in the recorded dtype) and run it again.

    The export names a model, a memorized set, reference prompts, an SSCD file
    and a normal set, but is not trusted to choose what is loaded: the bundled
    model is loaded by its name, anything else only when the caller names it
    (`model`, `memorized`, `reference_prompts`, `sscd`, `normal`, as for any `dori` command), so a
    ZIP never makes this open a file or folder or contact the network; a rerun
    loaded with other data than the export's is refused by `run_task`. A
    configuration that writes files (`out_dir`) runs only inside the caller's
    `out_dir` (`output_folder`). The configuration meets the same limits as every `run_task`
    call (`analysis.limits`).

    `callback` receives the run's progress events, as `run_task`'s does. Returns (recorded, reproduced);
    `compare_metrics` tells whether the numbers agree.
    """
    recorded = load_export(path)
    if recorded.kind not in TASKS:
        raise ValueError(f"{path}: unknown run kind {recorded.kind!r}; known kinds: {sorted(TASKS)}")
    check_limits(recorded.config)  # before a model is loaded for it
    if model is None and recorded.model != BUNDLED_MODEL_NAME:
        raise ValueError(f"the export was made on the model {recorded.model!r}; name the model to rerun it on "
                         "(`dori rerun ZIP --model FOLDER_OR_HUB_ID`): an export never chooses what is loaded")
    config = dict(recorded.config)
    if "out_dir" in config:
        config["out_dir"] = str(output_folder(config["out_dir"], out_dir))
    recorded_metric = config.get("replication") or {}
    if sscd is not None and sscd_threshold is None and recorded_metric.get("metric") == "SSCD":
        sscd_threshold = recorded_metric.get("threshold")  # a number, not a path: taken from the export
    handle = open_model(model, device=device, dtype=config.get("dtype", "float32"), memorized=memorized,
                        reference_prompts=reference_prompts, sscd=sscd, sscd_threshold=sscd_threshold,
                        normal=normal)
    reproduced = run_task(handle, recorded.kind, config, inputs=recorded.inputs(), callback=callback)
    return recorded, reproduced


def output_folder(recorded: object, folder: str | Path | None) -> Path:
    """Where a rerun writes what the export wrote to `recorded`: inside the caller's `folder`, always.

    A relative `recorded` is taken inside `folder` (ValueError if it climbs out); an absolute one that lies
    elsewhere (an app's run folder on the machine that made the export) becomes a folder of the same name in it.
    """
    if not isinstance(recorded, str) or not recorded:
        raise ValueError(f"the export's out_dir must name a folder, got {recorded!r}")
    if folder is None:
        raise ValueError(f"the export writes to {recorded!r}; give a folder for its output (`--out-dir DIR`): "
                         "a rerun writes only inside a folder you name")
    root = Path(folder).expanduser().resolve()
    target = (root / recorded).resolve()  # an absolute `recorded` stays itself
    if Path(recorded).is_absolute() and not target.is_relative_to(root) and Path(recorded).name:
        target = root / Path(recorded).name
    if not target.is_relative_to(root):
        raise ValueError(f"the export writes to {recorded!r}, outside the folder you gave ({root})")
    return target
