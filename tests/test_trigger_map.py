import dataclasses

import numpy as np
import pytest

from analysis.dori import DoriSearch
from analysis.tasks import record_map, run_task
from analysis.trigger_map import RANDOM_STARTS, TRIGGERS, map_settings
from analysis.triggers import build_trigger_set


@pytest.fixture(scope="module")
def trigger_set(tiny_handle, tmp_path_factory):
    return build_trigger_set(tiny_handle, tmp_path_factory.mktemp("triggers"), tiny_handle.memorized[0], count=3,
                             search=DoriSearch(steps=2, batch_size=2), starts_per_batch=3, seed=5,
                             evaluation_seeds=[0])


def test_map_holds_triggers_and_every_reference_set(tiny_handle, trigger_set):
    config, inputs = map_settings(tiny_handle, trigger_set)
    assert config["image"] == 0 and config["start_seed"] == 5 and inputs["triggers"] is trigger_set.embeddings
    trigger_map = record_map(run_task(tiny_handle, "trigger_map", {**config, "method": "pca"}, inputs=inputs))
    groups = [point.group for point in trigger_map.points]
    assert groups.count(TRIGGERS) == 3 and groups.count(RANDOM_STARTS) == 3
    assert groups.count("memorized prompts") == len(tiny_handle.memorized)
    assert groups.count("held-out prompts") == len(tiny_handle.held_out_prompts)
    triggers = trigger_map.triggers()
    assert [p.trigger for p in triggers] == [0, 1, 2] and {p.start_kind for p in triggers} == {"random"}
    assert [p.replication_rate for p in triggers] == [t["replication_rate"] for t in trigger_set.triggers]
    # The random reference is the triggers' own starts, labelled by the set's start seeds.
    assert [p.label for p in trigger_map.points if p.group == RANDOM_STARTS] == [
        "start seed 5", "start seed 6", "start seed 7"]
    assert trigger_map.caption == tiny_handle.memorized[0].caption

    # The coordinates are one PCA fitted on all points together.
    everything = np.array([[p.x, p.y] for p in trigger_map.points])
    first_axis_spread = everything[:, 0].var()
    assert first_axis_spread >= everything[:, 1].var() > 0


def test_map_refuses_a_set_of_another_model_or_an_empty_one(tiny_handle, trigger_set):
    other = dataclasses.replace(trigger_set, config={**trigger_set.config, "model": "some other model"})
    with pytest.raises(ValueError, match="made on 'some other model'"):
        map_settings(tiny_handle, other)
    empty = dataclasses.replace(trigger_set, triggers=[], embeddings=trigger_set.embeddings[:0])
    with pytest.raises(ValueError, match="empty"):
        map_settings(tiny_handle, empty)

