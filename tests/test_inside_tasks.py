"""The Inside view's run_task kinds (analysis.inside_tasks): filled configurations, export and rerun, `dori` commands."""

from __future__ import annotations

import json

import pytest
import torch

from analysis.cli import main
from analysis.detectors import DETECTORS
from analysis.export import compare_metrics, load_export, save_export
from analysis.rerun import rerun
from analysis.model import load_model
from analysis.sampling import DenoisingStep, encode_prompts
from analysis.task_settings import record_mask
from analysis.tasks import run_task

TINY_STEPS = 3
NEMO = {"method": "nemo", "parameters": {"threshold": -1, "steps": TINY_STEPS, "step_index": 1, "theta_start": 1,
                                         "refine": False, "scales": 2}, "seeds": [0, 1]}


@pytest.fixture(scope="module")
def folder_handle(tiny_model_folder):
    return load_model(tiny_model_folder)


def reproduces(record, path) -> None:
    recorded, reproduced = rerun(save_export(record, path), model=record.model)
    rows = compare_metrics(recorded.metrics, reproduced.metrics)
    assert rows and all(row["match"] for row in rows), [row for row in rows if not row["match"]]
    assert reproduced.config == recorded.config


def test_each_kind_fills_its_configuration_and_reruns_to_the_same_numbers(folder_handle, tmp_path):
    events = []
    attention = run_task(folder_handle, "attention", {"image": 0, "denoising_steps": [2, 0]}, callback=events.append)
    assert attention.config["steps"] == TINY_STEPS and attention.config["denoising_steps"] == [0, 2]
    assert attention.config["layers"] is None and attention.config["mitigation"] is None
    assert sum(isinstance(event, DenoisingStep) for event in events) == TINY_STEPS
    tokens = attention.metrics["tokens"]
    assert len(tokens) == folder_handle.tokenizer.model_max_length == len(attention.metrics["token_shares"])
    assert sum(attention.metrics["token_shares"]) == pytest.approx(1, abs=1e-4)
    assert {f"overlay{i}" for i in range(len(tokens))} <= set(attention.images)
    timeline = run_task(folder_handle, "timeline", {"image": 1, "seed": 2})
    assert len(timeline.metrics["similarities"]) == TINY_STEPS == len([n for n in timeline.images if "frame" in n])
    assert timeline.metrics["metric"] == folder_handle.replication_metric.name
    detect = run_task(folder_handle, "detect", {"prompt": folder_handle.held_out_prompts[0], "seeds": [0, 1]})
    assert set(detect.metrics["scores"]) == set(DETECTORS) == {row["detector"] for row in detect.table}
    assert detect.metrics["reference_prompts"] == len(folder_handle.held_out_prompts)
    reference = run_task(folder_handle, "reference", {})
    assert reference.metrics["reference"] == detect.metrics["reference"]
    assert len(reference.metrics["reference"]["noise_gap_per_step"]["p95"]) == TINY_STEPS
    for record in (attention, timeline, detect, reference):
        reproduces(record, tmp_path / f"{record.kind}.zip")


def test_a_trigger_embedding_under_a_mask(folder_handle, tmp_path):
    mask = record_mask(run_task(folder_handle, "localize", {"image": 0, **NEMO, "evaluation_seeds": [0]}))
    inputs = {f"mask.{name}": removed for name, removed in mask.removed.items()}
    inputs["embedding"] = encode_prompts(folder_handle, [folder_handle.memorized[0].caption]) + 0.5
    attention = run_task(folder_handle, "attention", {"image": 0, "mitigation": {"method": "mask"}}, inputs=inputs)
    assert {token["kind"] for token in attention.metrics["tokens"]} == {"position"}
    assert attention.metrics["conditioning"] == "embedding"
    assert attention.metrics["mitigation_removed"] == sum(mask.counts().values())
    plain = run_task(folder_handle, "attention", {"image": 0}, inputs={"embedding": inputs["embedding"]})
    assert not torch.equal(plain.tensors["maps"], attention.tensors["maps"])
    detect = run_task(folder_handle, "detect", {"image": 0, "seeds": [0], "mitigation": {"method": "mask"}},
                      inputs=inputs)
    for record in (attention, detect):
        reproduces(record, tmp_path / f"{record.kind}.zip")


@pytest.mark.parametrize("kind, config, inputs, message", [
    ("attention", {"image": 0, "denoising_steps": [TINY_STEPS]}, {}, "a denoising step must be"),
    ("attention", {"image": 0, "layers": ["nowhere"]}, {}, "no cross-attention layers named"),
    ("attention", {"image": 0, "layers": "down.1.attn.0"}, {}, "layers must be a list"),
    ("timeline", {"image": 0, "seeds": [0]}, {}, "unknown timeline setting"),
    ("detect", {"image": 0, "guidance": 1.0}, {}, "unconditional prediction"),
    ("detect", {"image": 0}, {"embedding": torch.zeros(2, 77, 32)}, "holds one embedding"),
    ("timeline", {"image": 0}, {"embedding": torch.zeros(77, 32)}, "must hold 1 to"),
])
def test_bad_settings_are_named(folder_handle, kind, config, inputs, message):
    with pytest.raises(ValueError, match=message):
        run_task(folder_handle, kind, config, inputs=inputs)


def test_dori_commands_export_and_rerun(tiny_model_folder, tmp_path, capsys):
    model = ["--model", str(tiny_model_folder)]
    assert main(["triggers", "--image", "0", "--folder", str(tmp_path / "t"), "--count", "1", "--search-steps", "1",
                 "--quiet", *model]) == 0
    runs = {"attention": ["--image", "0", "--layers", "down.1.attn.0", "--denoising-steps", "0-1"],
            "timeline": ["--image", "0", "--folder", str(tmp_path / "t"), "--trigger", "0"],
            "detect": ["--image", "1", "--seeds", "0"], "reference": []}
    for command, options in runs.items():
        export = tmp_path / f"{command}.zip"
        capsys.readouterr()
        assert main([command, *options, "--json", "--export", str(export), "--quiet", *model]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["kind"] == command and load_export(export).kind == command
        assert main(["rerun", str(export), "--json", *model]) == 0
        assert json.loads(capsys.readouterr().out)["reproduced"] is True
    assert printed["config"]["steps"] == TINY_STEPS
    assert main(["timeline", "--image", "0", "--trigger", "0", "--quiet", *model]) == 2
    assert "together" in capsys.readouterr().err


def test_a_latent_model_gets_maps_and_frames_at_the_image_size(tiny_sd_folder, memorized_set_dir,
                                                                reference_prompts_file):
    handle = load_model(tiny_sd_folder, memorized=memorized_set_dir, reference_prompts=reference_prompts_file)
    assert handle.image_size > handle.unet.config.sample_size  # a VAE between the UNet and the image
    settings = {"image": 0, "steps": 2}
    attention = run_task(handle, "attention", settings)
    size = handle.image_size
    assert attention.tensors["maps"].shape == (handle.tokenizer.model_max_length, size, size)
    torch.testing.assert_close(attention.tensors["maps"].sum(dim=0), torch.ones(size, size))
    timeline = run_task(handle, "timeline", settings)
    assert timeline.images["frame1"].shape == (3, size, size) and len(timeline.metrics["similarities"]) == 2
    detect = run_task(handle, "detect", {**settings, "seeds": [0]})
    assert detect.metrics["reference_prompts"] == len(handle.held_out_prompts)
