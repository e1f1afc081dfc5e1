"""Normal image-caption pairs for fine-tuning: a `--normal` set, the model's own generations (cached), mixing."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from tiny_sd import write_memorized_set

import analysis.normal
from analysis.cli import main
from analysis.demo.data import ProceduralShapes, render_shapes, split_shape_specs
from analysis.model import REPO_ROOT, load_model
from analysis.normal import (COCO_CAPTIONS_FILE, ImagePairs, MixedPairs, default_pairs, folder_pairs, generated_pairs,
                             normal_prompts)


@pytest.fixture(scope="module")
def handle(tiny_handle):
    return dataclasses.replace(tiny_handle, default_steps=2, default_guidance=3.0, train_prompts=[])


def test_image_pairs_draw_with_replacement_and_drop_captions(handle):
    images = torch.randn(3, 3, 16, 16)
    pairs = ImagePairs(images, ["a", "b", "c"], "three", caption_dropout=0.5)
    drawn, captions = pairs.sample(64, torch.Generator().manual_seed(0))
    assert drawn.shape == (64, 3, 16, 16) and len(captions) == 64
    assert set(captions) == {"", "a", "b", "c"}
    for image, caption in zip(drawn, captions):
        if caption:
            assert torch.equal(image, images["abc".index(caption)])
    with pytest.raises(ValueError, match="as many captions as images"):
        ImagePairs(images, ["a"], "mismatched")


def test_the_model_generates_its_own_pairs_once_then_reads_them_from_the_cache(handle, tmp_path, monkeypatch):
    done = []
    pairs = generated_pairs(handle, 3, cache_dir=tmp_path, progress=lambda i, n: done.append((i, n)))
    assert pairs.images.shape == (3, *handle.memorized[0].image.shape)
    assert pairs.captions == normal_prompts(handle)[:3] == normal_prompts(handle)[:3]
    assert done == [(1, 3), (2, 3), (3, 3)]
    # Without training captions of its own, the model draws COCO's.
    assert normal_prompts(handle)[:3] == analysis.normal.read_prompt_list(COCO_CAPTIONS_FILE)[:3]
    # Each caption from its own noise: not three copies of one picture.
    assert not torch.equal(pairs.images[0], pairs.images[1])

    def no_sampling(*args, **kwargs):
        raise AssertionError("the cached pairs were generated again")

    monkeypatch.setattr(analysis.normal, "sample", no_sampling)
    again = generated_pairs(handle, 3, cache_dir=tmp_path)
    assert torch.equal(again.images, pairs.images)
    # Other weights are another cache entry.
    changed = dataclasses.replace(handle, train_prompts=["a red circle", "a blue ring", "a green square"])
    with pytest.raises(AssertionError, match="generated again"):
        generated_pairs(changed, 3, cache_dir=tmp_path)


def test_a_normal_set_is_read_at_the_models_resolution(handle, tmp_path):
    folder = write_memorized_set(tmp_path / "normal", captions=["a red circle", "a blue ring"])
    pairs = folder_pairs(handle, folder)
    assert pairs.images.shape == (2, 3, 16, 16) and pairs.captions == ["a red circle", "a blue ring"]
    chosen = default_pairs(dataclasses.replace(handle, normal_set=str(folder)))
    assert chosen.captions == pairs.captions and "normal set" in chosen.description


def test_a_missing_normal_set_is_refused_when_the_model_loads(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="no normal set at"):
        load_model(tiny_model_dir, normal=tmp_path)


def old_normal_draw(photos, share, n, generator):
    """The fine-tuning's draw of normal rows before the sources were separated (photos, then procedural shapes):
    the bundled model's measured fine-tuning results came from it."""
    specs = split_shape_specs()[0]
    n_photos = round(share * n)
    picks = torch.randint(len(photos), (n_photos,), generator=generator).tolist()
    images, captions = [photos[i].image for i in picks], [photos[i].caption for i in picks]
    chosen = [specs[i] for i in torch.randint(len(specs), (n - n_photos,), generator=generator)]
    dropped = (torch.rand(len(chosen), generator=generator) < 0.1).tolist()
    images += list(render_shapes(chosen, generator))
    captions += ["" if drop else spec.caption for spec, drop in zip(chosen, dropped)]
    return torch.stack(images), captions


def test_memorized_photos_and_procedural_shapes_draw_as_before(tiny_handle):
    photos = [dataclasses.replace(item, image=torch.zeros(3, 32, 32)) for item in tiny_handle.memorized]
    mixed = MixedPairs(photos, ProceduralShapes(), photo_share=0.25)
    new_images, new_captions = mixed.sample(16, torch.Generator().manual_seed(3))
    old_images, old_captions = old_normal_draw(photos, 0.25, 16, torch.Generator().manual_seed(3))
    assert new_captions == old_captions and torch.equal(new_images, old_images)
    with pytest.raises(ValueError, match="no normal training pairs"):
        MixedPairs([], None, 0.25)


def test_fine_tuning_imports_nothing_from_the_demo_model():
    modules = sorted((REPO_ROOT / "analysis" / "finetune").glob("*.py"))
    assert modules
    for path in modules:
        imported = {node.module for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)}
        assert not any(module.startswith("analysis.demo") for module in imported if module), path


FINETUNE_SETTINGS = ("--param", "rounds=1", "--param", "triggers_per_image=1", "--param", "steps_per_round=1",
                     "--param", 'dori={"steps": 1, "batch_size": 1}', "--param", "surrogate_seeds=1",
                     "--param", "eval_seeds=1", "--param", "normal_batch=2", "--param", "adversarial_batch=2",
                     "--param", "normal_images=2")


@pytest.mark.parametrize("with_set", [True, False], ids=["normal set", "own generations"])
def test_one_round_on_the_tiny_latent_model_with_each_kind_of_normal_pairs(
        with_set, tiny_sd_folder, memorized_set_dir, tmp_path, capsys):
    options = ["--model", str(tiny_sd_folder), "--memorized", str(memorized_set_dir)]
    if with_set:
        options += ["--normal", str(write_memorized_set(tmp_path / "normal", captions=["a field", "a street"]))]
    code = main(["finetune", "--targets", "0", "--out-dir", str(tmp_path / "ft"), *FINETUNE_SETTINGS, *options,
                 "--quiet", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    metrics = json.loads(out)["metrics"]
    assert metrics["utility_loss"] == "distillation"  # a latent model's default
    expected = "normal set" if with_set else "the model's own generations for 2"
    assert expected in metrics["normal_pairs"]
    assert Path(metrics["model_dir"], "unet").is_dir()
