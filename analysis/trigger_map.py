"""A trigger set on a 2-D map beside reference embeddings: what the app's Trigger map view plots.

    trigger_map = map_trigger_set(handle, TriggerSet.load(folder), method="umap")
    for point in trigger_map.points: point.x, point.y, point.group, point.replication_rate

One projection (`analysis.projection.Projection`) is fitted on the triggers
and the reference sets of `analysis.dispersion.reference_sets` together, so
every point lies on the same map: the memorized captions, the held-out
captions, and the random embeddings the triggers started from (drawn with the
set's own start seeds, so each trigger can be seen beside its start).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from analysis.dispersion import reference_sets
from analysis.model import ModelHandle
from analysis.projection import DEFAULT_CACHE_DIR, Projection
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


def map_trigger_set(handle: ModelHandle, trigger_set: TriggerSet, method: str = "umap", seed: int = 0,
                    cache_dir: str | Path | None = DEFAULT_CACHE_DIR) -> TriggerMap:
    """Project the triggers of `trigger_set` and the handle's reference sets onto one 2-D map.

    The random reference holds one start per trigger (`Start.random(set seed + i)`,
    as `build_trigger_set` drew them). Raises ValueError for an empty set or
    a set made on another model.
    """
    if not trigger_set.triggers:
        raise ValueError("the trigger set is empty: build some triggers first")
    if trigger_set.config["model"] != handle.name:
        raise ValueError(f"the trigger set was made on {trigger_set.config['model']!r}, not on {handle.name!r}")
    count = len(trigger_set.triggers)
    references = reference_sets(handle, n_random=count, seed=trigger_set.config["seed"])
    labels = {"memorized prompts": [image.caption for image in handle.memorized],
              "held-out prompts": list(handle.held_out_prompts),
              "random": [f"start seed {trigger_set.config['seed'] + i}" for i in range(count)]}
    points = [MapPoint(0.0, 0.0, TRIGGERS, f"trigger {trigger['index']}", trigger["index"],
                       trigger["start"]["kind"], trigger["replication_rate"]) for trigger in trigger_set.triggers]
    for name, embeddings in references.items():
        points += [MapPoint(0.0, 0.0, REFERENCE_NAMES[name], label, None, None, None) for label in labels[name]]
    embeddings = torch.cat([trigger_set.embeddings.float().cpu(), *references.values()])
    xy = Projection(method, seed=seed, cache_dir=cache_dir).fit(embeddings).reference_xy_
    for point, (x, y) in zip(points, xy.tolist()):
        point.x, point.y = x, y
    return TriggerMap(method, trigger_set.config["caption"], points)
