"""Every analysis as one call with a JSON configuration: what the app, the command line and campaigns run.

    record = run_task(handle, "attack", {"image": 0, "mitigation": {"method": "nemo"}})

`run_task` checks the configuration (ValueError naming the bad value), fills
in every default (the handle's steps and guidance, the localizer's
parameters, ...) so that `record.config` is complete, runs the analysis and
returns an `analysis.export.RunRecord`. A kind's settings, with their defaults and ranges, are its settings
class `TASKS[kind].settings` (`analysis.settings`), defined beside its runner. Kinds:

* "replicate": `analysis.replicate.replicate` of a training image or a prompt;
* "localize": a NeMo or Wanda mask (tensors `mask.LAYER`), replication before and after it;
* "attack": a Dori search toward a training image, optionally against a mitigated model, then `evaluate`;
* "sweep": `analysis.sweep.perturbation_sweep`;
* "attribute": token attribution by gradient norm, Integrated Gradients or word occlusion;
* "wen": Wen et al.'s inference-time mitigation of a training image's caption, generations before and after;
* "finetune": `analysis.finetune.AdversarialFineTuning` of the targets; the tuned model goes to `out_dir/model`;
* "trigger_map": the `triggers` input on a 2-D map beside the reference sets (`analysis.trigger_map`), and the
  dispersion of every set (`record_map` gives the map back);
* "discrepancy": `analysis.discrepancy.activation_discrepancy` of the `triggers` input and of reference prompts;
* "agreement": NeMo and Wanda fitted on every `triggers` input, pairwise IoU of their masks per layer
  (`analysis.agreement`);
* "attention", "timeline", "detect", "reference": the Inside view's, defined in `analysis.inside_tasks`.

The target is `image` (index of a memorized training image; its caption is
the default prompt) and/or `prompt`. `inputs` are tensors the configuration
refers to: `target` (an image `[3, H, W]` in [-1, 1] instead of a training
image), start embeddings `[77, d]`, `embedding` (what "replicate" generates instead of the prompt's encoding, e.g.
a trigger), `mask.LAYER` (a given mitigation),
`triggers` (embeddings `[N, 77, d]` of one image's triggers, for the last three
kinds, where `image`/`prompt` name what they replicate). They
are stored in the record as `input.NAME`, so `analysis.rerun.rerun` can run
it again. `mitigation` is None, `{"method": "nemo"|"wanda", "parameters": {...}}`
(computed for the prompt) or `{"method": "mask"}` (the `mask.*` inputs).

`callback` receives what the analysis streams (`analysis.progress`): `DenoisingStep` while sampling,
`DoriStep` while searching, `FineTuneProgress` while fine-tuning, `TaskProgress` otherwise. It may raise
`analysis.sampling.SamplingCancelled` to stop.

Every record's configuration also names the dtype and what the model was
analysed against (`ModelHandle.data_settings`): its memorized set, its
reference prompts and the replication metric with its threshold. A recorded
configuration given back must match the handle in these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from analysis.dori_tasks import AttackSettings, FinetuneSettings, run_attack, run_finetune
from analysis.export import INPUT_PREFIX, RunRecord
from analysis.inside_tasks import INSIDE_TASKS
from analysis.limits import MAX_INPUT_MAGNITUDE
from analysis.model import ModelHandle
from analysis.progress import Callback
from analysis.replication_tasks import (AttributeSettings, LocalizeSettings, ReplicateSettings, SweepSettings,
                                        WenSettings, run_attribute, run_localize, run_replicate, run_sweep, run_wen)
from analysis.settings import as_json, defaults, fill
from analysis.task_settings import check_data, check_dtype, check_limits
from analysis.trigger_set_tasks import (AgreementSettings, DiscrepancySettings, TriggerMapSettings, record_map,
                                        run_agreement, run_discrepancy, run_trigger_map)

__all__ = ["TASKS", "Task", "record_map", "run_task"]


@dataclass(frozen=True)
class Task:
    """A kind: its settings class (defaults, help, ranges) and its runner `(handle, filled config, inputs,
    callback) -> RunRecord`."""

    settings: type
    run: Callable[[ModelHandle, dict, dict, Callback | None], RunRecord]


TASKS: dict[str, Task] = {
    "replicate": Task(ReplicateSettings, run_replicate),
    "localize": Task(LocalizeSettings, run_localize),
    "attack": Task(AttackSettings, run_attack),
    "sweep": Task(SweepSettings, run_sweep),
    "attribute": Task(AttributeSettings, run_attribute),
    "wen": Task(WenSettings, run_wen),
    "finetune": Task(FinetuneSettings, run_finetune),
    "trigger_map": Task(TriggerMapSettings, run_trigger_map),
    "discrepancy": Task(DiscrepancySettings, run_discrepancy),
    "agreement": Task(AgreementSettings, run_agreement),
    **{kind: Task(settings, run) for kind, (settings, run) in INSIDE_TASKS.items()},
}


def run_task(handle: ModelHandle, kind: str, config: dict | None = None, callback: Callback | None = None,
             inputs: dict[str, torch.Tensor] | None = None) -> RunRecord:
    """Run one analysis of `kind` with `config` (see the module docstring) and return its complete record.

    The configuration is filled from the kind's settings class (unknown settings refused) before its runner
    checks and runs it."""
    if kind not in TASKS:
        raise ValueError(f"unknown analysis {kind!r}; choose one of {sorted(TASKS)}")
    config = dict(config or {})
    dtype = check_dtype(handle, config)
    data = check_data(handle, config)
    for key in ("dtype", *data):
        config.pop(key, None)
    inputs = dict(inputs or {})
    check_limits(config)
    for name, tensor in inputs.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"input {name!r} must be a tensor, got {type(tensor).__name__}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"input {name!r} holds NaN or infinite values")
        if tensor.is_floating_point() and tensor.numel() and tensor.abs().max() > MAX_INPUT_MAGNITUDE:
            raise ValueError(f"input {name!r} holds values up to {tensor.abs().max().item():.3g}; inputs are "
                             f"accepted up to ±{MAX_INPUT_MAGNITUDE:g} (a text embedding's values stay far below)")
    task = TASKS[kind]
    record = task.run(handle, fill(kind, defaults(task.settings), config), inputs, callback)
    record.config = as_json({**record.config, "dtype": dtype, **data})
    record.tensors.update({INPUT_PREFIX + name: tensor for name, tensor in inputs.items()})
    return record
