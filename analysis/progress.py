"""How every long computation reports progress and is stopped: one callback, one exception.

A long computation (sampling, a Dori search, fine-tuning, a localizer, a
sweep, an analysis run by `analysis.tasks.run_task`) takes `callback`, a
function of one event, and calls it after each unit of work: a
`analysis.sampling.DenoisingStep` per denoising step, an
`analysis.dori.DoriStep` per search step, an `analysis.finetune.FineTuneProgress`
while fine-tuning, a `TaskProgress` for any other stage (a localizer's
criterion evaluation, a sweep's radius). The callback may raise
`analysis.sampling.SamplingCancelled` to stop; the computation lets it
propagate, and `analysis.hooks.hooked` removes its hooks and restores the
weights on the way out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class TaskProgress:
    """Progress of a stage that streams neither denoising nor search steps."""

    stage: str  # "NeMo initial selection", "sweep", ...
    done: int
    total: int | None  # None: not known in advance
    message: str = ""
    unit: str = "rounds"  # what `done` counts


Callback = Callable[[object], None]


def report(callback: Callback | None, stage: str, done: int, total: int | None, message: str = "",
           unit: str = "rounds") -> None:
    """`callback(TaskProgress(...))` when there is a callback."""
    if callback is not None:
        callback(TaskProgress(stage, done, total, message, unit))
