"""The memorization experiment runs on any model folder with a memorized.json and writes its table and figures."""

import json

import pytest

from analysis.experiments import memorization


def test_memorization_experiment_on_a_model_folder(tiny_model_folder, tmp_path):
    memorization.main(["--seeds", "2", "--held-out", "2", "--model", str(tiny_model_folder), "--out", str(tmp_path)])
    result = json.loads((tmp_path / "memorization.json").read_text())
    assert result["summary"]["model"] == str(tiny_model_folder)
    assert len(result["memorized"]) == 2 and len(result["held_out"]) == 3  # 2 held-out prompts + the empty one
    assert all(len(row["similarities"]) == 2 for row in result["memorized"] + result["held_out"])
    assert set(result["summary"]["wen_auc_by_first_steps"]) == {"1", "2", "3"}
    assert all(0.0 <= auc <= 1.0 for auc in result["summary"]["wen_auc_by_first_steps"].values())
    assert str(tiny_model_folder) in (tmp_path / "memorization.md").read_text()
    assert (tmp_path / "memorization_grid.png").stat().st_size > 0


def test_memorization_experiment_refuses_a_model_without_targets(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit):
        memorization.main(["--model", str(tiny_model_dir), "--out", str(tmp_path)])
