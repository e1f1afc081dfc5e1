"""A trigger set on a 2-D map beside reference embeddings: what the app's Trigger map view plots.

    config, inputs = map_settings(handle, TriggerSet.load(folder))
    record = run_task(handle, "trigger_map", {**config, "method": "umap"}, inputs=inputs)
    for point in record_map(record).points: point.x, point.y, point.group, point.replication_rate

(`run_task` and `record_map` are in `analysis.tasks`.) One projection
(`analysis.projection.Projection`) is fitted on the triggers and the reference
sets of `analysis.dispersion.reference_sets` together (`map_triggers`), so
every point lies on the same map: the memorized captions, the held-out
captions, and the random embeddings the triggers started from (drawn with the
set's own start seeds, so each trigger can be seen beside its start).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from analysis.metrics import similarity_label
from analysis.model import ModelHandle
from analysis.projection import Projection
from analysis.triggers import TriggerSet

TRIGGERS = "triggers"
RANDOM_STARTS = "random starts"
# reference_sets names its Gaussian set "random"; on this map they are the triggers' own starts.
REFERENCE_NAMES = {"memorized prompts": "memorized prompts", "held-out prompts": "held-out prompts",
                   "random": RANDOM_STARTS}


@dataclass
class MapPoint:
    x: float
    y: float
    group: str  # TRIGGERS, "memorized prompts", "held-out prompts" or RANDOM_STARTS
    label: str  # what the point is: a caption, "trigger 3", "start seed 3"
    trigger: int | None  # index into the trigger set, for triggers
    start_kind: str | None  # a trigger's start: "random", "prompt", "embedding"
    replication_rate: float | None  # a trigger's stored replication rate, if it was evaluated


@dataclass
class TriggerMap:
    method: str
    caption: str  # the image the triggers replicate
    points: list[MapPoint]

    def triggers(self) -> list[MapPoint]:
        return [point for point in self.points if point.group == TRIGGERS]


def map_triggers(handle: ModelHandle, triggers: torch.Tensor, references: dict[str, torch.Tensor],
                 projection: Projection, caption: str, start_seed: int, start_kinds: Sequence[str],
                 replication_rates: Sequence[float | None]) -> TriggerMap:
    """Fit `projection` on triggers `[N, 77, d]` and `references` (`reference_sets(handle, N, start_seed)`) together.

    Trigger i is labelled with `start_kinds[i]` and `replication_rates[i]`
    (None: not evaluated); the random reference's start i with seed `start_seed + i`.
    """
    labels = {"memorized prompts": [image.caption for image in handle.memorized],
              "held-out prompts": list(handle.held_out_prompts),
              "random": [f"start seed {start_seed + i}" for i in range(len(references["random"]))]}
    points = [MapPoint(0.0, 0.0, TRIGGERS, f"trigger {i}", i, kind, rate)
              for i, (kind, rate) in enumerate(zip(start_kinds, replication_rates, strict=True))]
    for name, embeddings in references.items():
        points += [MapPoint(0.0, 0.0, REFERENCE_NAMES[name], label, None, None, None) for label in labels[name]]
    xy = projection.fit(torch.cat([triggers.float().cpu(), *references.values()])).reference_xy_
    for point, (x, y) in zip(points, xy.tolist(), strict=True):
        point.x, point.y = x, y
    return TriggerMap(projection.method, caption, points)


def map_settings(handle: ModelHandle, trigger_set: TriggerSet) -> tuple[dict, dict[str, torch.Tensor]]:
    """The configuration (all but the projection) and inputs of the "trigger_map" task that maps `trigger_set`.

    Raises ValueError for an empty set, a set made on another model, one
    whose image is not among the handle's memorized images, or one whose
    replication rates were judged by another metric than the handle's.
    """
    if not trigger_set.triggers:
        raise ValueError("the trigger set is empty: build some triggers first")
    if trigger_set.config["model"] != handle.name:
        raise ValueError(f"the trigger set was made on {trigger_set.config['model']!r}, not on {handle.name!r}")
    captions = [image.caption for image in handle.memorized]
    if trigger_set.config["caption"] not in captions:
        raise ValueError(f"the trigger set's image “{trigger_set.config['caption']}” is not a memorized image of "
                         f"{handle.name!r}")
    evaluation = trigger_set.config["evaluation"]
    if evaluation is not None and evaluation["replication"] != handle.replication_metric.settings():
        raise ValueError(f"the trigger set's replication rates were judged by "
                         f"{similarity_label(evaluation['replication']['metric'])} > "
                         f"{evaluation['replication']['threshold']:g}; this model by "
                         f"{handle.replication_metric.describe()}: build a set with this metric")
    config = dict(image=captions.index(trigger_set.config["caption"]), start_seed=trigger_set.config["seed"],
                  start_kinds=[trigger["start"]["kind"] for trigger in trigger_set.triggers],
                  replication_rates=[trigger["replication_rate"] for trigger in trigger_set.triggers])
    return config, {"triggers": trigger_set.embeddings}
