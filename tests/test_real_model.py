"""Every `dori` command on a tiny latent SD pipeline folder (`save_pretrained`, PNDM scheduler, no sidecar) with an
imagefolder memorized set, a reference prompt list and SSCD as the replication metric: what README's "Your own
Stable Diffusion model" section runs."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_sd import REFERENCE_PROMPTS, SET_CAPTIONS

from analysis.cli import main
from analysis.export import load_export
from analysis.metrics import SSCD, SSCD_THRESHOLD
from analysis.model import load_model
from analysis.progress import TaskProgress
from analysis.tasks import run_task

# Few sampling steps wherever a command takes them; the folder's own default is SD's 50.
STEPS = ("--steps", "2")
# NeMo compares δ of 8x8 latents: one MS-SSIM scale fits.
NEMO_SETTINGS = ("steps=3", "step_index=1", "scales=1", "window=7", "theta_start=1", "refine=false",
                 "calibration_seeds=[0,1]")
NEMO = tuple(arg for setting in NEMO_SETTINGS for arg in ("--param", setting))


@pytest.fixture()
def dori(tiny_sd_folder, memorized_set_dir, reference_prompts_file, capsys):
    """Run `dori ARGS` on the tiny SD folder with its memorized set and reference prompts; (exit code, stdout, stderr).

    `sscd`: a TorchScript file to judge replication with."""

    def run(*args: str, model: bool = True, sscd=None):
        options = ["--model", str(tiny_sd_folder), "--memorized", str(memorized_set_dir),
                   "--reference-prompts", str(reference_prompts_file)] if model else []
        options += ["--sscd", str(sscd)] if sscd is not None else []
        code = main([*args, *options, "--quiet"])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def run_json(dori, *args, **kwargs) -> dict:
    code, out, err = dori(*args, "--json", **kwargs)
    assert code == 0, err
    return json.loads(out)


def rerun_reproduces(dori, export, *options: str, sscd=None) -> None:
    """`dori rerun` of an export, given the model, set, prompts (and SSCD file) again: a ZIP never names a path
    that is loaded. Without them it is refused."""
    code, out, err = dori("rerun", str(export), "--json", *options, sscd=sscd)
    assert code == 0, err
    assert json.loads(out)["reproduced"] is True
    code, _, err = dori("rerun", str(export), *options, model=False)
    assert code == 2 and "name the model to rerun it on" in err


def test_replicate_with_the_memorized_set_and_rerun(dori, memorized_set_dir, tmp_path):
    printed = run_json(dori, "replicate", "--image", "1", "--seeds", "0-1", *STEPS, "--export", str(tmp_path / "r.zip"))
    assert printed["config"]["prompt"] == SET_CAPTIONS[1]
    assert printed["config"]["memorized_set"] == str(memorized_set_dir.resolve())
    assert printed["config"]["replication"] == {"metric": "pixel correlation", "threshold": 0.75, "sscd": None}
    assert len(printed["metrics"]["similarities"]) == 2 and "wen_first_step" in printed["metrics"]
    record = load_export(tmp_path / "r.zip")
    assert record.images["seed0"].shape == (3, 16, 16)  # decoded by the VAE at the model's size
    rerun_reproduces(dori, tmp_path / "r.zip")


@pytest.mark.parametrize("method, params", [("nemo", NEMO), ("wanda", ("--param", "record_steps=1",
                                                                       "--param", "steps=2"))])
def test_localize_uses_the_reference_prompts(dori, method, params, tmp_path):
    printed = run_json(dori, "localize", "--method", method, "--image", "0", "--seeds", "0,1", "--evaluation-seeds",
                       "0", *params, "--export", str(tmp_path / "m.zip"))
    assert printed["config"]["method"] == method and "after_rate" in printed["metrics"]
    assert printed["config"]["reference_prompts"].endswith("prompts.csv")
    rerun_reproduces(dori, tmp_path / "m.zip")


def test_attack_targets_the_sets_image_encoded_by_the_vae(dori, tiny_sd_folder, memorized_set_dir, tmp_path):
    printed = run_json(dori, "attack", "--image", "0", "--search-steps", "2", "--batch-size", "2",
                       "--evaluation-seeds", "0", *STEPS, "--mitigation", "wanda", "--param", "record_steps=1",
                       "--param", "steps=2", "--export", str(tmp_path / "a.zip"))
    assert len(printed["metrics"]["final_loss"]) == 1 and printed["metrics"]["mitigation_removed"] >= 0
    record = load_export(tmp_path / "a.zip")
    handle = load_model(tiny_sd_folder, memorized=memorized_set_dir)
    # The target is the set's image in pixels; the generations are decoded to the same size.
    torch.testing.assert_close(record.images["target"], handle.memorized[0].image, atol=1 / 127.5, rtol=0)
    assert record.images["start0_seed0"].shape == (3, 16, 16)
    rerun_reproduces(dori, tmp_path / "a.zip")


def test_sweep_and_attribute(dori):
    printed = run_json(dori, "sweep", "--image", "1", "--radii", "0,3", "--directions", "1", "--seeds", "0", *STEPS)
    assert len(printed["metrics"]["rates"]) == 2
    printed = run_json(dori, "attribute", "--image", "0", "--method", "occlusion", "--param", "seeds=[0]")
    assert len(printed["table"]) == len(SET_CAPTIONS[0].split())


def test_trigger_set_map_discrepancy_and_agreement(dori, tmp_path):
    folder = str(tmp_path / "t")
    printed = run_json(dori, "triggers", "--image", "0", "--folder", folder, "--count", "3", "--starts-per-batch", "3",
                       "--search-steps", "2", "--evaluation-seeds", "0")
    assert printed["count"] == 3
    runs = {"map": ("--method", "pca"), "discrepancy": ("--count", "2", "--steps", "2"),
            "agreement": ("--count", "2", "--seeds", "0,1",
                          *[arg for setting in NEMO_SETTINGS for arg in ("--nemo-param", setting)],
                          "--wanda-param", "record_steps=1", "--wanda-param", "steps=2")}
    for command, options in runs.items():
        export = tmp_path / f"{command}.zip"
        printed = run_json(dori, command, "--folder", folder, *options, "--export", str(export))
        assert printed["config"]["image"] == 0
        rerun_reproduces(dori, export)
    # The map's reference sets: the memorized set's captions and the reference prompts.
    labels = {row["group"]: set() for row in load_export(tmp_path / "map.zip").table}
    for row in load_export(tmp_path / "map.zip").table:
        labels[row["group"]].add(row["label"])
    assert labels["memorized prompts"] == set(SET_CAPTIONS) and labels["held-out prompts"] == set(REFERENCE_PROMPTS)


def test_finetune_one_round(dori, tmp_path):
    printed = run_json(dori, "finetune", "--targets", "0", "--out-dir", str(tmp_path / "ft"), "--param", "rounds=1",
                       "--param", "triggers_per_image=1", "--param", "steps_per_round=1",
                       "--param", 'dori={"steps": 1, "batch_size": 1}', "--param", "surrogate_seeds=1",
                       "--param", "eval_seeds=1", "--param", "normal_batch=2", "--param", "adversarial_batch=2",
                       "--export", str(tmp_path / "ft.zip"))
    tuned = load_model(printed["metrics"]["model_dir"])
    assert [m.caption for m in tuned.memorized] == SET_CAPTIONS and not tuned.pixel_space
    rerun_reproduces(dori, tmp_path / "ft.zip", "--out-dir", str(tmp_path))


def test_campaign_over_the_sets_captions(dori, tmp_path):
    summary = run_json(dori, "campaign", "--prompts", "bundled", "--out-dir", str(tmp_path / "c"),
                       "--set", "seeds=[0]", "--set", "steps=2")
    assert summary["computed"] == len(SET_CAPTIONS)


def test_sscd_is_the_metric_every_result_and_export_names(dori, sscd_file, tiny_sd_folder, memorized_set_dir,
                                                          tmp_path):
    printed = run_json(dori, "replicate", "--image", "0", "--seeds", "0-1", *STEPS, "--export", str(tmp_path / "r.zip"),
                       sscd=sscd_file)
    assert printed["config"]["replication"] == {"metric": "SSCD", "threshold": SSCD_THRESHOLD,
                                                "sscd": str(sscd_file.resolve())}
    assert printed["config"]["threshold"] == SSCD_THRESHOLD
    record = load_export(tmp_path / "r.zip")
    handle = load_model(tiny_sd_folder, memorized=memorized_set_dir)
    generated = torch.stack([record.images["seed0"], record.images["seed1"]])
    expected = SSCD(sscd_file)(generated, handle.memorized[0].image[None])[:, 0]
    torch.testing.assert_close(torch.tensor(printed["metrics"]["similarities"]), expected, atol=0.02, rtol=0)
    assert all("similarity (SSCD)" in row["caption"] for row in printed["table"])
    attack = run_json(dori, "attack", "--image", "0", "--search-steps", "1", "--batch-size", "1",
                      "--evaluation-seeds", "0", *STEPS, "--export", str(tmp_path / "a.zip"), sscd=sscd_file)
    assert attack["config"]["replication"]["metric"] == "SSCD"
    assert load_export(tmp_path / "a.zip").config["replication"]["metric"] == "SSCD"
    rerun_reproduces(dori, tmp_path / "a.zip", sscd=sscd_file)
    code, _, err = dori("rerun", str(tmp_path / "a.zip"))  # the SSCD file is not given again
    assert code == 2 and "recorded with replication" in err
    code, _, err = dori("replicate", "--image", "0", *STEPS, "--sscd-threshold", "0.5")
    assert code == 2 and "--sscd-threshold needs --sscd" in err


@pytest.mark.parametrize("make, message", [
    (lambda path: path.write_bytes(b"not TorchScript"), "is not a TorchScript file"),
    (lambda path: None, "no SSCD TorchScript file at"),
], ids=["not TorchScript", "missing"])
def test_a_bad_sscd_file_is_a_clear_error_at_start(dori, tmp_path, make, message):
    path = tmp_path / "sscd.pt"
    make(path)
    code, out, err = dori("replicate", "--image", "0", *STEPS, sscd=path)
    assert code == 2 and message in err and out == ""


def test_a_v_prediction_folder_runs_the_story(tiny_sd_vpred_folder, memorized_set_dir, reference_prompts_file,
                                              capsys, tmp_path):
    """The SD 2.x-style folder (v-prediction) through replicate, NeMo, a Dori attack and one round of fine-tuning."""
    model = ["--model", str(tiny_sd_vpred_folder), "--memorized", str(memorized_set_dir), "--reference-prompts",
             str(reference_prompts_file), "--quiet", "--json"]
    commands = [
        ["replicate", "--image", "0", "--seeds", "0-1", *STEPS],
        ["localize", "--method", "nemo", "--image", "0", "--seeds", "0,1", "--evaluation-seeds", "0", *NEMO],
        ["attack", "--image", "1", "--search-steps", "2", "--batch-size", "2", "--evaluation-seeds", "0", *STEPS],
        ["finetune", "--targets", "1", "--out-dir", str(tmp_path / "ft"),
         *[arg for setting in ["rounds=1", "triggers_per_image=1", "steps_per_round=1", 'dori={"steps": 1}',
                               "surrogate_seeds=1", "eval_seeds=1", "normal_batch=2", "adversarial_batch=2"]
           for arg in ("--param", setting)]],
    ]
    for command in commands:
        code = main([*command, *model])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert json.loads(out)["kind"] == command[0]
    assert load_model(tmp_path / "ft" / "model").scheduler.config.prediction_type == "v_prediction"


def test_a_trigger_set_judged_by_another_metric_is_not_mapped(dori, sscd_file, tmp_path):
    folder = str(tmp_path / "t")
    run_json(dori, "triggers", "--image", "0", "--folder", folder, "--count", "2", "--starts-per-batch", "2",
             "--search-steps", "1", "--evaluation-seeds", "0")
    code, out, err = dori("map", "--folder", folder, "--method", "pca", sscd=sscd_file)
    assert code == 2 and "judged by similarity (pixel correlation) > 0.75" in err and "similarity (SSCD) > 0.7" in err


def test_localizing_says_how_many_reference_prompts_it_reads(tiny_sd_folder, memorized_set_dir,
                                                             reference_prompts_file):
    handle = load_model(tiny_sd_folder, memorized=memorized_set_dir, reference_prompts=reference_prompts_file)
    messages = []
    run_task(handle, "localize", dict(image=0, method="wanda", parameters=dict(record_steps=1, steps=2), seeds=[0],
                                      evaluation_seeds=[0]),
             callback=lambda event: messages.append(event.message) if isinstance(event, TaskProgress) else None)
    assert messages[0].startswith(f"wanda: statistics of {len(REFERENCE_PROMPTS)} reference prompts")
