import pytest
import torch

from analysis.dori import DoriSearch
from analysis.sampling import SamplingCancelled
from analysis.triggers import TriggerSet, build_trigger_set

SEARCH = DoriSearch(steps=2, batch_size=2)


def test_interrupted_set_resumes_where_it_stopped(tiny_handle, tmp_path):
    target = tiny_handle.memorized[0]

    def stop_in_second_batch(progress):
        if progress.finished >= 2:
            raise SamplingCancelled

    with pytest.raises(SamplingCancelled):
        build_trigger_set(tiny_handle, tmp_path / "set", target, count=5, search=SEARCH, starts_per_batch=2,
                          callback=stop_in_second_batch)
    partial = TriggerSet.load(tmp_path / "set")
    assert [t["index"] for t in partial.triggers] == [0, 1] and partial.embeddings.shape == (2, 77, 32)
    assert not partial.complete

    batches_started = []
    resumed = build_trigger_set(tiny_handle, tmp_path / "set", target, count=5, search=SEARCH, starts_per_batch=2,
                                callback=lambda p: batches_started.append(p.finished) if p.step.index == 0 else None)
    assert batches_started == [2, 4]  # the first batch is not searched again
    assert resumed.complete and resumed.embeddings.shape == (5, 77, 32)
    assert [t["index"] for t in resumed.triggers] == list(range(5))
    assert torch.equal(resumed.embeddings[:2], partial.embeddings)

    # A trigger depends on its index only: the resumed set equals one built in a single run.
    uninterrupted = build_trigger_set(tiny_handle, tmp_path / "single", target, count=5, search=SEARCH,
                                      starts_per_batch=2)
    assert torch.equal(uninterrupted.embeddings, resumed.embeddings)
    assert uninterrupted.triggers == resumed.triggers

    loaded = TriggerSet.load(tmp_path / "set")
    assert loaded.config == resumed.config and loaded.triggers == resumed.triggers
    assert torch.equal(loaded.embeddings, resumed.embeddings) and torch.equal(loaded.target, target.image)
    assert loaded.config["caption"] == target.caption and loaded.config["search"]["steps"] == 2
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["triggers.json", "triggers.safetensors"]

    with pytest.raises(ValueError, match="other settings"):
        build_trigger_set(tiny_handle, tmp_path / "set", target, count=5, search=DoriSearch(steps=3, batch_size=2),
                          starts_per_batch=2)


def test_trigger_metadata_with_evaluation(tiny_handle, tmp_path):
    target = tiny_handle.memorized[1]
    trigger_set = build_trigger_set(tiny_handle, tmp_path, target, count=2, search=SEARCH, starts_per_batch=2,
                                    seed=10, evaluation_seeds=[0])
    first = trigger_set.triggers[0]
    assert first["start"] == dict(kind="random", seed=10, scale=None)
    assert len(first["losses"]) == 2 and first["final_loss"] == first["losses"][-1]
    assert first["distance_from_start"] > 0 and first["distance_from_prompt"] > 0
    assert first["replication_rate"] in (0.0, 1.0) and -1 <= first["mean_similarity"] <= 1
    assert trigger_set.config["evaluation"]["seeds"] == [0]
