"""The `dori` command line, called in-process on the tiny model folder."""

from __future__ import annotations

import dataclasses
import json
import runpy
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel

from analysis.bench import SD14_UNET_CONFIG
from analysis.bench import dori as dori_bench
from analysis.bench import sampling as sampling_bench
from analysis.cli import main, parse_seeds
from analysis.dori import Start
from analysis.export import load_export
from analysis.masks import Mask
from analysis.sampling import encode_prompts


@pytest.fixture()
def dori(tiny_model_folder, capsys):
    """Run `dori ARGS --model <tiny folder>`; returns (exit code, stdout, stderr)."""

    def run(*args: str, model: bool = True):
        code = main([*args, *(["--model", str(tiny_model_folder)] if model else [])])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_seed_ranges():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("0-1,7") == [0, 1, 7]


def test_replicate_prints_json_and_writes_files(dori, tiny_model_folder, tmp_path):
    code, out, err = dori("replicate", "--image", "0", "--seeds", "0-2", "--json", "--out", str(tmp_path / "r.json"),
                          "--export", str(tmp_path / "r.zip"))
    assert code == 0, err
    printed = json.loads(out)
    assert printed["config"]["seeds"] == [0, 1, 2] and len(printed["metrics"]["similarities"]) == 3
    assert json.loads((tmp_path / "r.json").read_text()) == printed
    assert load_export(tmp_path / "r.zip").metrics == printed["metrics"]
    assert "sampling" in err  # the progress bar goes to stderr


def test_localize_saves_a_mask_that_attack_and_rerun_use(dori, tmp_path):
    code, _, err = dori("localize", "--method", "wanda", "--image", "0", "--seeds", "0", "--evaluation-seeds", "0",
                        "--param", "record_steps=2", "--save-mask", str(tmp_path / "m.safetensors"))
    assert code == 0, err
    mask = Mask.load(tmp_path / "m.safetensors")
    assert mask.method == "wanda" and sum(mask.counts().values()) > 0
    code, out, err = dori("attack", "--image", "0", "--mask", str(tmp_path / "m.safetensors"), "--search-steps", "2",
                          "--batch-size", "2", "--evaluation-seeds", "0", "--prompt-start", "--random-starts", "2",
                          "--start-seed", "7", "--json", "--export", str(tmp_path / "a.zip"))
    assert code == 0, err
    printed = json.loads(out)
    assert [start["kind"] for start in printed["config"]["starts"]] == ["random", "random", "prompt"]
    assert [start.get("seed") for start in printed["config"]["starts"]] == [7, 8, None]
    assert printed["metrics"]["mitigation_removed"] == sum(mask.counts().values())
    code, out, err = dori("rerun", str(tmp_path / "a.zip"), "--json")
    assert code == 0, err
    assert "Dori search" in err and "sampling" in err  # the rerun's progress, on stderr as every command's
    assert json.loads(out)["reproduced"] is True


def test_sweep_and_attribute(dori):
    code, out, err = dori("sweep", "--image", "1", "--radii", "0,3", "--directions", "1", "--seeds", "0", "--json")
    assert code == 0, err
    assert len(json.loads(out)["metrics"]["rates"]) == 2
    code, out, err = dori("attribute", "--image", "0", "--method", "integrated_gradients", "--param", "n_steps=4",
                          "--param", "seeds=[0]", "--json")
    assert code == 0, err
    assert json.loads(out)["config"]["parameters"]["n_steps"] == 4


def test_triggers_resume_in_the_same_folder(dori, tmp_path):
    args = ("triggers", "--image", "0", "--folder", str(tmp_path / "t"), "--starts-per-batch", "1", "--json")
    code, out, err = dori(*args, "--count", "2", "--search-steps", "2")
    assert code == 0, err
    assert json.loads(out)["count"] == 2
    code, out, err = dori(*args, "--count", "2", "--search-steps", "3")
    assert code == 2 and "other settings" in err



def test_a_trigger_set_is_mapped_compared_and_rerun(dori, tmp_path):
    folder = str(tmp_path / "t")
    code, _, err = dori("triggers", "--image", "1", "--folder", folder, "--count", "3", "--starts-per-batch", "3",
                        "--search-steps", "2", "--evaluation-seeds", "0")
    assert code == 0, err
    nemo = ["--nemo-param", "threshold=-1", "--nemo-param", "steps=3", "--nemo-param", "step_index=1",
            "--nemo-param", "theta_start=1", "--nemo-param", "refine=false", "--nemo-param", "scales=2"]
    runs = {"map": ("--method", "pca"), "discrepancy": ("--count", "2", "--layers", "ff"),
            "agreement": ("--count", "2", "--seeds", "0,1", *nemo, "--wanda-param", "record_steps=1")}
    for command, options in runs.items():
        export = str(tmp_path / f"{command}.zip")
        code, out, err = dori(command, "--folder", folder, *options, "--json", "--export", export)
        assert code == 0, err
        printed = json.loads(out)
        assert printed["config"]["image"] == 1 and len(load_export(export).inputs()["triggers"]) == (
            3 if command == "map" else 2)
        code, out, err = dori("rerun", export, "--json")
        assert code == 0 and json.loads(out)["reproduced"] is True, err
    assert printed["config"]["nemo"]["threshold"] == -1 and printed["config"]["wanda"]["record_steps"] == 1
    code, _, err = dori("map", "--folder", str(tmp_path / "none"))
    assert code == 2 and "no trigger set in" in err


@pytest.mark.parametrize("args, message", [
    (("replicate", "--image", "9"), "image must be a whole number from 0 to 1"),
    (("replicate",), "give a prompt"),
    (("attack", "--prompt", "a cat"), "needs a target image"),
    (("replicate", "--image", "0", "--mask", "/nonexistent.safetensors"), "no mask file"),
    (("localize", "--method", "wanda", "--image", "0", "--param", "sparsity=2"), "sparsity must be in"),
    (("replicate", "--image", "0", "--dtype", "float64"), "unknown dtype"),
])
def test_bad_input_exits_2_with_a_message(dori, args, message):
    code, out, err = dori(*args)
    assert code == 2 and message in err and out == ""


def test_bad_model_and_bad_export(dori, tmp_path, capsys):
    assert main(["replicate", "--image", "0", "--model", str(tmp_path / "nowhere")]) == 2
    assert "no model folder" in capsys.readouterr().err
    (tmp_path / "x.zip").write_text("not a zip")
    code, _, err = dori("rerun", str(tmp_path / "x.zip"), model=False)
    assert code == 2 and "not a ZIP" in err


def test_argument_errors_are_one_line_and_help_keeps_the_usage(capsys):
    assert main(["replicate", "--seeds", "zero"]) == 2
    err = capsys.readouterr().err
    assert "seeds must look like" in err and len(err.splitlines()) == 1 and "usage:" not in err
    assert main(["replicate", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: dori replicate")


def test_python_dash_m_analysis_is_the_command_line(tiny_model_folder, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["analysis", "replicate", "--image", "1", "--seeds", "0", "--quiet", "--json",
                                      "--model", str(tiny_model_folder)])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_module("analysis", run_name="__main__")
    assert stopped.value.code == 0
    assert json.loads(capsys.readouterr().out)["config"]["image"] == 1


def test_finetune_exports_and_reruns(dori, tmp_path):
    code, out, err = dori("finetune", "--targets", "0", "--out-dir", str(tmp_path / "ft"), "--param", "rounds=1",
                          "--param", "triggers_per_image=1", "--param", "steps_per_round=1",
                          "--param", 'dori={"steps": 1, "batch_size": 1}', "--param", "surrogate_seeds=1",
                          "--param", "eval_seeds=1", "--param", "normal_batch=2", "--param", "adversarial_batch=2",
                          "--json", "--export", str(tmp_path / "ft.zip"))
    assert code == 0, err
    assert "round 1/1 finished in" in err  # each finished round is a line of its own
    printed = json.loads(out)
    assert printed["metrics"]["model_dir"] == str(tmp_path / "ft" / "model")
    assert (tmp_path / "ft" / "model" / "unet").is_dir()
    code, out, err = dori("rerun", str(tmp_path / "ft.zip"), "--json", "--out-dir", str(tmp_path))
    assert code == 0 and json.loads(out)["reproduced"] is True, out


def test_campaign_over_the_models_captions(dori, tmp_path):
    code, out, err = dori("campaign", "--prompts", "bundled", "--out-dir", str(tmp_path / "c"), "--set", "seeds=[0]",
                          "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["computed"] == 2 and summary["table"][0]["items"] == 2
    code, out, err = dori("campaign", "--prompts", "bundled", "--out-dir", str(tmp_path / "c"), "--set", "seeds=[0]",
                          "--json")
    assert code == 0 and json.loads(out)["computed"] == 0  # all done already
    code, _, err = dori("campaign", "--prompts", "nowhere.csv", "--out-dir", str(tmp_path / "d"))
    assert code == 2 and "no prompt list" in err


def test_combined_benchmark_pieces_run_on_the_tiny_model(tiny_handle):
    """`python -m analysis.bench` reuses the sampling and Dori benchmarks' `measure`; shapes only, no timing asserted."""
    handle = dataclasses.replace(tiny_handle, default_steps=2)
    sampling = sampling_bench.measure(handle, repeats=1)
    assert len(sampling["ours_s"]) == len(sampling["theirs_s"]) == 1 and sampling["ratio"] > 0
    target = handle.memorized[0]
    dori = dori_bench.measure(handle, target.image, Start.random(0), encode_prompts(handle, [target.caption]),
                              repeats=1, search_steps=2)
    assert len(dori["step_s"]) == len(dori["search_s"]) == 1 and dori["ratio"] > 0
    with torch.device("meta"):  # the GPU part's UNet: SD v1.4's published size, without allocating it
        unet = UNet2DConditionModel(**SD14_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
