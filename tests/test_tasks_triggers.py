"""The analyses of a trigger set as tasks: "trigger_map", "discrepancy", "agreement"; exported and rerun."""

from __future__ import annotations

import pytest
import torch

from analysis.export import compare_metrics, save_export
from analysis.rerun import rerun
from analysis.model import load_model
from analysis.tasks import record_map, run_task
from analysis.trigger_map import RANDOM_STARTS, TRIGGERS

# Small NeMo and Wanda settings for the tiny model: a fixed threshold (no calibration), one selection round.
NEMO = {"threshold": -1.0, "steps": 3, "step_index": 1, "theta_start": 1.0, "theta_min": 1.0, "refine": False,
        "scales": 2}
WANDA = {"steps": 2, "record_steps": 1}


@pytest.fixture(scope="module")
def folder_handle(tiny_model_folder):
    """A model `rerun` can load again by its name."""
    return load_model(tiny_model_folder)


@pytest.fixture(scope="module")
def triggers(folder_handle):
    width = folder_handle.unet.config.cross_attention_dim
    return torch.randn(3, 77, width, generator=torch.Generator().manual_seed(0)) * 0.5


def reruns_to_the_same_numbers(record, path):
    recorded, reproduced = rerun(save_export(record, path), model=record.model)
    rows = compare_metrics(recorded.metrics, reproduced.metrics)
    assert rows and all(row["match"] for row in rows), [row for row in rows if not row["match"]]
    assert reproduced.config == recorded.config
    return recorded


def test_trigger_map_holds_every_point_and_reruns(folder_handle, triggers, tmp_path):
    config = {"image": 1, "method": "pca", "start_seed": 5, "start_kinds": ["random", "random", "prompt"],
              "replication_rates": [0.5, 0.0, None]}
    record = run_task(folder_handle, "trigger_map", config, inputs={"triggers": triggers})
    assert record.config["prompt"] == folder_handle.memorized[1].caption
    assert record.config["parameters"]["seed"] == 0 and "cache_dir" not in record.config["parameters"]
    metrics = record.metrics
    assert (metrics["triggers"], metrics["evaluated"], metrics["replicating"]) == (3, 2, 1)
    assert metrics["mean_replication_rate"] == pytest.approx(0.25)
    assert set(metrics["dispersion"]) == {TRIGGERS, "memorized prompts", "held-out prompts", RANDOM_STARTS}
    assert metrics["dispersion"][TRIGGERS]["size"] == 3 and metrics["dispersion"][TRIGGERS]["mean"] > 0
    assert len(record.table) == 3 + len(folder_handle.memorized) + len(folder_handle.held_out_prompts) + 3
    assert "target" in record.images

    recorded = reruns_to_the_same_numbers(record, tmp_path / "map.zip")
    # The exported table gives the same map back: coordinates, labels and each trigger's rate and start.
    assert record_map(recorded) == record_map(record)
    points = record_map(recorded).triggers()
    assert [(p.start_kind, p.replication_rate) for p in points] == [("random", 0.5), ("random", 0.0), ("prompt", None)]
    assert [p.label for p in record_map(recorded).points if p.group == RANDOM_STARTS] == [
        "start seed 5", "start seed 6", "start seed 7"]


def test_discrepancy_per_layer_reruns(folder_handle, triggers, tmp_path):
    progress = []
    record = run_task(folder_handle, "discrepancy", {"image": 0, "layers": "ff"}, callback=progress.append,
                      inputs={"triggers": triggers})
    assert [p.done for p in progress] == [1, 2]
    assert record.config["prompts"] == [m.caption for m in folder_handle.memorized]
    assert record.config["steps"] == folder_handle.default_steps
    layers = list(record.metrics["triggers"])
    assert layers and list(record.metrics["prompts"]) == layers and all(".ff" in layer for layer in layers)
    assert [row["layer"] for row in record.table] == layers
    assert all(row["triggers_relative"] > 0 and row["prompts_relative"] > 0 for row in record.table)
    reruns_to_the_same_numbers(record, tmp_path / "discrepancy.zip")


def test_agreement_compares_nemo_and_wanda_per_layer_and_reruns(folder_handle, triggers, tmp_path):
    config = {"image": 0, "seeds": [0, 1], "nemo": NEMO, "wanda": WANDA}
    record = run_task(folder_handle, "agreement", config, inputs={"triggers": triggers[:2]})
    layers = [row["layer"] for row in record.table]
    # Wanda ran on NeMo's layers (the value projections of the down and mid blocks).
    assert record.config["wanda"]["layers"] == layers and all(layer.endswith("to_v") for layer in layers)
    for name in ("nemo_nemo", "wanda_wanda", "nemo_wanda"):
        assert list(record.metrics[name]) == layers
        assert record.tensors[f"iou.{name}"].shape == (len(layers), 2, 2)
        for layer, value in record.metrics[name].items():
            assert 0 <= value["undefined"] <= 1
            assert value["mean_iou"] is None or 0 <= value["mean_iou"] <= 1
    assert all(record.tensors[f"{method}.{i}.{layer}"].dtype == torch.bool
               for method in ("nemo", "wanda") for i in (0, 1) for layer in layers)
    assert record.table[0]["nemo_neurons"] == sum(
        record.tensors[f"nemo.{i}.{layers[0]}"].sum().item() for i in (0, 1)) / 2
    reruns_to_the_same_numbers(record, tmp_path / "agreement.zip")


@pytest.mark.parametrize("kind, config, inputs, message", [
    ("discrepancy", {"image": 0}, {}, "needs the embeddings as the input 'triggers'"),
    ("discrepancy", {"image": 0}, {"triggers": torch.zeros(1, 77, 32)}, "2 to 256 embeddings"),
    ("discrepancy", {"image": 0}, {"triggers": torch.zeros(2, 77, 8)}, r"\[n, 77, 32\], got shape \(2, 77, 8\)"),
    ("discrepancy", {"image": 0, "layers": "conv"}, None, "layers must be one of"),
    ("discrepancy", {"image": 0, "prompts": ["one"]}, None, "at least 2 prompts"),
    ("discrepancy", {"triggers": 3}, None, "unknown discrepancy setting"),
    ("agreement", {}, None, "give a prompt or the index of a training image"),
    ("agreement", {"image": 0, "nemo": {"sparsity": 0.1}}, None, "unknown nemo parameter"),
    ("trigger_map", {"image": 0, "method": "mds"}, None, "unknown projection method 'mds'"),
    ("trigger_map", {"image": 0, "parameters": {"seed": -1}}, None, "seed must be a whole number"),
    ("trigger_map", {"image": 0, "start_kinds": ["random"]}, None, "one of .* per trigger"),
    ("trigger_map", {"image": 0, "replication_rates": [0.5, "high", None]}, None, "replication rate must be a number"),
])
def test_bad_settings_are_refused(folder_handle, triggers, kind, config, inputs, message):
    with pytest.raises(ValueError, match=message):
        run_task(folder_handle, kind, config, inputs={"triggers": triggers} if inputs is None else inputs)

