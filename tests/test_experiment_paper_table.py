"""The paper's table (`analysis.experiments.paper_table`) on the tiny latent SD folder: its shape, resuming, Ray.

The tiny model's numbers mean nothing; what is checked is that every row is measured for every image, the control
row for every control image, and that a resumed or Ray run finishes the same table.
"""

from __future__ import annotations

import json

import pytest
from tiny_sd import write_memorized_set

from analysis.experiments import paper_table
from analysis.experiments.paper_table import ROWS, image_rows, main, run

NEMO = dict(steps=3, step_index=1, scales=1, window=7, theta_start=1, refine=False, calibration_seeds=[0, 1])
FINETUNE = dict(rounds=1, triggers_per_image=1, steps_per_round=1, dori=dict(steps=1, batch_size=1),
                surrogate_seeds=1, eval_seeds=1, normal_batch=2, adversarial_batch=2, normal_images=2)


@pytest.fixture(scope="module")
def config(tiny_sd_folder, memorized_set_dir, reference_prompts_file, tmp_path_factory):
    controls = write_memorized_set(tmp_path_factory.mktemp("controls") / "set", captions=["a quiet harbour"], seed=7)
    return dict(model=str(tiny_sd_folder), device="cpu", dtype="float32", memorized=str(memorized_set_dir),
                reference_prompts=str(reference_prompts_file), sscd=None, sscd_threshold=None, normal=None,
                controls=str(controls), seeds=[0, 1], search=dict(steps=1, batch_size=2),
                nemo=dict(NEMO), wanda=dict(record_steps=1), finetune=dict(FINETUNE))


@pytest.fixture(scope="module")
def local_run(config, tmp_path_factory):
    folder = tmp_path_factory.mktemp("table")
    return folder, run(config, folder, images=[0])


def test_every_row_for_the_image_and_the_control_row_for_the_control(local_run):
    folder, outcome = local_run
    assert outcome["computed"] == 2  # image 0 and the one control image
    assert [line["row"] for line in outcome["table"]] == list(ROWS)
    assert all(line["images"] == 1 for line in outcome["table"])
    for line in outcome["table"]:
        assert 0 <= line["mr"] <= 1 and -1 <= line["similarity_mean"] <= 1
    items = sorted(path.name for path in (folder / "items").glob("*.json"))
    assert items == ["control-0000.json", "image-0000.json"]
    assert "pixel correlation" in outcome["markdown"] and "control + Dori" in outcome["markdown"]


def test_a_killed_run_resumes_and_finishes_the_same_table(config, local_run, tmp_path, monkeypatch):
    _, finished = local_run
    calls = []

    def dies_on_the_second(item, config):
        if calls:
            raise KeyboardInterrupt  # the kill
        calls.append(item["id"])
        return image_rows(item, config)

    monkeypatch.setattr(paper_table, "image_rows", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path, images=[0])
    monkeypatch.undo()
    resumed = run(config, tmp_path, images=[0])
    assert resumed["computed"] == 1 and resumed["table"] == finished["table"]
    with pytest.raises(ValueError, match="other settings"):
        run({**config, "seeds": [5]}, tmp_path, images=[0])


def test_a_local_ray_cluster_gives_the_same_table(config, local_run, tmp_path):
    ray = pytest.importorskip("ray")
    _, finished = local_run
    try:
        outcome = run(config, tmp_path, images=[0], executor="ray", workers=2)
    finally:
        ray.shutdown()
    assert outcome["table"] == finished["table"]


def test_the_command_line_writes_the_report(config, tmp_path, capsys):
    argv = ["--model", config["model"], "--memorized", config["memorized"], "--reference-prompts",
            config["reference_prompts"], "--images", "0", "--seeds", "1", "--search-steps", "1",
            "--nemo", json.dumps(NEMO), "--wanda", json.dumps(config["wanda"]), "--finetune", json.dumps(FINETUNE),
            "--out-dir", str(tmp_path / "run"), "--report", str(tmp_path / "table.md")]
    main(argv)
    assert "| original | 1 |" in capsys.readouterr().out
    assert "adversarial fine-tuning + Dori" in (tmp_path / "table.md").read_text()
