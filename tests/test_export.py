"""Run records as ZIP exports, and reruns of them (also of one the app exported) on a model folder."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from gradio_client import Client

from analysis.bench import free_port

from analysis.export import RunRecord, compare_metrics, load_export, save_export
from analysis.rerun import rerun
from analysis.model import load_model
from analysis.progress import TaskProgress
from analysis.task_settings import record_mask
from analysis.tasks import run_task
from dori_ui.app import build_app

TINY_STEPS = 3
WANDA = {"method": "wanda", "parameters": {"steps": TINY_STEPS, "record_steps": 2}, "seeds": [0]}


@pytest.fixture(scope="module")
def folder_handle(tiny_model_folder):
    return load_model(tiny_model_folder)


def test_round_trip_keeps_every_part(tmp_path):
    image = torch.linspace(-1, 1, 3 * 4 * 5).view(3, 4, 5)
    record = RunRecord(
        kind="replicate", model="some/model", config={"seeds": [0, 1], "prompt": "a cat", "mitigation": None},
        metrics={"rate": 0.5, "per_seed": [0.25, 0.75], "nested": {"a": 1}},
        images={"seed0": image}, table=[{"seed": 0, "caption": "x, y", "similarity": 0.5, "replicated": True}],
        tensors={"embedding": torch.randn(2, 77, 8), "mask.down.1.attn.0.to_v": torch.tensor([True, False])})
    path = save_export(record, tmp_path / "sub" / "run.zip")
    loaded = load_export(path)
    assert (loaded.kind, loaded.model, loaded.config, loaded.metrics, loaded.table) == (
        record.kind, record.model, record.config, record.metrics, record.table)
    torch.testing.assert_close(loaded.images["seed0"], image, atol=1 / 127.5, rtol=0)
    assert set(loaded.tensors) == set(record.tensors)
    assert torch.equal(loaded.tensors["embedding"], record.tensors["embedding"])
    assert loaded.tensors["mask.down.1.attn.0.to_v"].dtype == torch.bool
    header = json.loads(zipfile.ZipFile(path).read("config.json"))
    assert header["kind"] == "replicate" and {"python", "torch", "diffusers"} <= set(header["versions"])


def test_bad_files_give_clear_errors(tmp_path):
    not_zip = tmp_path / "notes.zip"
    not_zip.write_text("hello")
    with pytest.raises(ValueError, match="not a ZIP"):
        load_export(not_zip)
    no_config = tmp_path / "empty.zip"
    with zipfile.ZipFile(no_config, "w") as archive:
        archive.writestr("metrics.json", "{}")
    with pytest.raises(ValueError, match="no config.json"):
        load_export(no_config)
    unknown = tmp_path / "unknown.zip"
    with zipfile.ZipFile(unknown, "w") as archive:
        archive.writestr("config.json", json.dumps(dict(format=1, kind="teleport", model="m", config={})))
    with pytest.raises(ValueError, match="unknown run kind 'teleport'"):
        rerun(unknown)
    with pytest.raises(FileNotFoundError):
        load_export(tmp_path / "missing.zip")
    with pytest.raises(ValueError, match="NaN"):
        save_export(RunRecord("replicate", "m", {}, metrics={"rate": float("nan")}), tmp_path / "nan.zip")


@pytest.mark.parametrize("config, message", [
    ({"image": 0, "seedz": [0]}, "unknown replicate setting"),
    ({"image": 7}, "image must be a whole number from 0 to 1"),
    ({"image": 0, "seeds": []}, "list of 1 to 64 seeds"),
    ({"image": 0, "seeds": list(range(100_000))}, "at most 64"),
    ({"image": 0, "seeds": [2**70]}, "from 0 to 2147483647"),
    ({"image": 0, "steps": 5000}, "at most 500"),
    ({"image": 0, "guidance": float("nan")}, "finite number"),
    ({"image": 0, "mitigation": {"method": "nemo", "parameters": {"steps": 10**6}}}, "steps must be at most"),
    ({"image": 0, "mitigation": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}}}, "nested more than"),
    ({"prompt": "x" * 20_000}, "characters"),
    ({"image": 0, "seeds": [0, -1]}, "got -1"),
    ({"prompt": "   "}, "non-empty string"),
    ({}, "give a prompt"),
    ({"image": 0, "steps": 0}, "steps must be"),
    ({"image": 0, "dtype": "float16"}, "recorded in float16"),
    ({"image": 0, "mitigation": {"method": "lobotomy"}}, "unknown localize method 'lobotomy'"),
    ({"image": 0, "mitigation": {"method": "wanda", "parameters": {"spars": 0.1}}}, "unknown wanda parameter"),
])
def test_bad_configurations_are_refused(tiny_handle, config, message):
    with pytest.raises(ValueError, match=message):
        run_task(tiny_handle, "replicate", config)


def test_unknown_kind_and_missing_target(tiny_handle):
    with pytest.raises(ValueError, match="unknown analysis 'teleport'"):
        run_task(tiny_handle, "teleport", {})
    with pytest.raises(ValueError, match="needs a target image"):
        run_task(tiny_handle, "attack", {"prompt": "a cat"})
    with pytest.raises(ValueError, match="NaN"):
        run_task(tiny_handle, "attack", {"image": 0}, inputs={"target": torch.full((3, 16, 16), float("nan"))})
    with pytest.raises(ValueError, match="accepted up to"):  # finite, but a search from it only returns NaN
        run_task(tiny_handle, "attack", {"image": 0, "starts": [{"kind": "embedding", "input": "start"}]},
                 inputs={"start": torch.full((77, tiny_handle.unet.config.cross_attention_dim), 1e30)})


def test_replicate_record_is_complete_and_streams_steps(tiny_handle):
    seen = []
    record = run_task(tiny_handle, "replicate", {"image": 1, "seeds": [3, 4], "steps": TINY_STEPS},
                      callback=lambda step: seen.append(step.index))
    assert record.config == {"image": 1, "prompt": tiny_handle.memorized[1].caption, "seeds": [3, 4],
                             "steps": TINY_STEPS, "guidance": tiny_handle.default_guidance,
                             "threshold": pytest.approx(0.75), "mitigation": None, "dtype": "float32",
                             "memorized_set": None, "reference_prompts": None, "normal_set": None,
                             "replication": {"metric": "pixel correlation", "threshold": 0.75, "sscd": None}}
    assert seen == list(range(TINY_STEPS))
    assert list(record.images) == ["seed3", "seed4"] and len(record.table) == 2
    assert record.metrics["rate"] == sum(record.metrics["replicated"]) / 2


def test_rerun_reproduces_replicate_and_attack(folder_handle, tiny_model_folder, tmp_path):
    """A replicate run and a Dori attack under a Wanda mask, exported and rerun from the model folder."""
    runs = {
        "replicate": {"image": 0, "seeds": [0, 1]},
        "attack": {"image": 1, "starts": [{"kind": "random", "seed": 2}, {"kind": "prompt"}],
                   "search": {"steps": 3, "batch_size": 2}, "evaluation_seeds": [0], "mitigation": WANDA},
    }
    for kind, config in runs.items():
        record = run_task(folder_handle, kind, config)
        assert record.model == str(tiny_model_folder)
        recorded, reproduced = rerun(save_export(record, tmp_path / f"{kind}.zip"), model=record.model)
        rows = compare_metrics(recorded.metrics, reproduced.metrics)
        assert rows and all(row["match"] for row in rows), [row for row in rows if not row["match"]]
        assert reproduced.config == recorded.config
    assert any(name.startswith("mask.") for name in recorded.tensors)  # the attack's mitigation mask


def test_given_mask_and_embedding_start_are_inputs_of_the_rerun(folder_handle, tmp_path):
    mask = record_mask(run_task(folder_handle, "localize", {"image": 0, **WANDA, "evaluation_seeds": [0]}))
    inputs = {f"mask.{name}": removed for name, removed in mask.removed.items()}
    inputs["trigger"] = torch.randn(77, folder_handle.unet.config.cross_attention_dim)
    progress = []
    record = run_task(folder_handle, "sweep", {"image": 0, "radii": [0, 2], "directions": 1, "seeds": [0],
                                               "mitigation": {"method": "mask"}}, callback=progress.append, inputs=inputs)
    radii_done = [p.done for p in progress if isinstance(p, TaskProgress) and "denoising step" not in p.message]
    assert radii_done == [1, 2]
    assert record.metrics["mitigation_removed"] == sum(mask.counts().values())
    attack = run_task(folder_handle, "attack", {"image": 0, "starts": [{"kind": "embedding", "input": "trigger"}],
                                                "search": {"steps": 2, "batch_size": 2}, "evaluation_seeds": [0]},
                      inputs=inputs)
    torch.testing.assert_close(attack.tensors["starts"][0], inputs["trigger"])
    for name, run in (("sweep", record), ("attack", attack)):
        recorded, reproduced = rerun(save_export(run, tmp_path / f"{name}.zip"), model=run.model)
        assert all(row["match"] for row in compare_metrics(recorded.metrics, reproduced.metrics))


def test_a_zip_exported_by_the_app_reruns_to_the_same_numbers(folder_handle, tmp_path):
    app = build_app(folder_handle)
    _, url, _ = app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False)
        client.predict(folder_handle.memorized[1].caption, 2, 5, TINY_STEPS, 4.0, api_name="/replicate")
        exported = client.predict(api_name="/export_replicate")
    finally:
        app.close()
    recorded, reproduced = rerun(exported, model=str(folder_handle.name))
    assert recorded.config["seeds"] == [5, 6] and recorded.config["guidance"] == 4.0
    rows = compare_metrics(recorded.metrics, reproduced.metrics)
    assert len(rows) >= 5 and all(row["match"] for row in rows)
