"""The demo model's training command: data sampling, checkpoints, resume and continuing from a model folder."""

import json

import pytest
import torch
from safetensors.torch import load_file

from analysis.demo import train
from analysis.demo.architecture import build_text_encoder, build_tokenizer
from analysis.demo.data import (CONTROLS_V2, PHOTOS_V2, DemoDataset, load_set, read_colors, recipe_captions,
                               render_shapes, split_shape_specs)
from analysis.model import load_model


def unet_weights(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_photo_weights_choose_which_photos_are_drawn():
    weights = [0.0] * 8
    weights[3] = 1.0
    data = DemoDataset(photo_share=1.0, seed=0, photo_weights=weights)
    images, captions = data.sample(16)
    assert set(captions) == {data.photo_captions[3]}
    assert torch.equal(images, data.photos[3].expand_as(images))


@pytest.mark.parametrize("weights", [[1.0] * 7, [1.0] * 7 + [-1.0], [0.0] * 8])
def test_bad_photo_weights_are_refused(weights):
    with pytest.raises(ValueError, match="photo_weights"):
        DemoDataset(photo_weights=weights)


def run(tmp_path, name, *extra):
    out, work = tmp_path / name, tmp_path / f"{name}-run"
    train.main(["--out", str(out), "--work-dir", str(work), "--batch-size", "2", "--warmup", "1",
                "--device", "cpu", *extra])
    return out, work


def test_training_writes_a_loadable_folder_and_resume_continues(tmp_path):
    out, work = run(tmp_path, "model", "--steps", "1", "--offset-noise", "0.1")
    handle = load_model(out)
    assert len(handle.memorized) == 8
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 1 and record["continued_from"] is None and record["recipe"]["offset_noise"] == 0.1

    train.main(["--out", str(out), "--work-dir", str(work), "--batch-size", "2", "--warmup", "1",
                "--device", "cpu", "--steps", "2", "--resume"])
    assert json.loads((out / "training.json").read_text())["steps"] == 2
    assert torch.load(work / "checkpoint.pt")["step"] == 2


def test_init_from_starts_from_the_folder_and_keeps_its_history(tmp_path):
    source, _ = run(tmp_path, "source", "--steps", "1")
    # At learning rate 0 the optimiser moves nothing, so the result must be the source's UNet exactly.
    continued, _ = run(tmp_path, "continued", "--steps", "1", "--lr", "0", "--init-from", str(source),
                       "--photo-weights", "1", "1", "1", "6", "6", "1", "1", "1")
    before, after = unet_weights(source), unet_weights(continued)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    record = json.loads((continued / "training.json").read_text())
    assert record["continued_from"]["steps"] == 1
    assert record["recipe"]["photo_weights"] == [1, 1, 1, 6, 6, 1, 1, 1]


def test_init_from_keeps_the_folders_tokenizer_and_text_encoder(tmp_path):
    source, _ = run(tmp_path, "source", "--steps", "1", "--seed", "1")
    continued, _ = run(tmp_path, "continued", "--steps", "1", "--init-from", str(source))
    assert (continued / "tokenizer" / "tokenizer.json").read_text() == (source / "tokenizer" / "tokenizer.json").read_text()
    before = load_file(str(source / "text_encoder" / "model.safetensors"))
    after = load_file(str(continued / "text_encoder" / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_init_from_refuses_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(SystemExit, match="not a demo model folder"):
        run(tmp_path, "continued", "--steps", "1", "--init-from", str(tmp_path))


def test_read_colors_reads_the_captions_colours_back_from_renderings():
    specs = [*split_shape_specs()[0], *split_shape_specs()[1]]
    read = read_colors(render_shapes(specs, torch.Generator().manual_seed(1)))
    assert read == [(spec.background, spec.color) for spec in specs]
    plain = torch.full((1, 3, 32, 32), -1.0)  # all black: a background and nothing on it
    assert read_colors(plain) == [("black", None)]


def test_recipe_v2_duplicates_its_images_like_laion_and_keeps_v1_as_it_was():
    assert recipe_captions("v1") == DemoDataset().all_captions()
    data = DemoDataset(photo_share=1.0, recipe="v2")
    assert len(data.photos) == len(PHOTOS_V2) == 24 and len(set(data.photo_captions)) == 24
    _, captions = data.sample(4000)
    counts = torch.tensor([captions.count(c) for c in data.photo_captions], dtype=torch.float)
    weights = torch.tensor([p.weight for p in PHOTOS_V2])
    assert torch.allclose(counts / counts.sum(), weights / weights.sum(), atol=0.02)
    assert set(weights.tolist()) == {16.0, 4.0, 1.0}


def test_recipe_v2_controls_are_images_it_never_trains_on():
    _, controls = load_set(CONTROLS_V2)
    photos = DemoDataset(recipe="v2").photos
    assert controls.shape == (len(CONTROLS_V2), 3, 32, 32)
    assert not any(torch.allclose(c, p, atol=0.05) for c in controls for p in photos)


def given_text_encoder(folder):
    tokenizer = build_tokenizer(recipe_captions("v2"), vocab_size=600)
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    build_text_encoder(len(tokenizer), seed=3).save_pretrained(str(folder / "text_encoder"))
    return folder


def same_text_encoder(a, b):
    before = load_file(str(a / "text_encoder" / "model.safetensors"))
    after = load_file(str(b / "text_encoder" / "model.safetensors"))
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_training_v2_with_a_given_text_encoder_keeps_it(tmp_path):
    given = given_text_encoder(tmp_path / "encoder")
    out, _ = run(tmp_path, "model", "--steps", "1", "--data", "v2", "--photo-share", "0.04", "--text-encoder", str(given))
    assert len(load_model(out).memorized) == 24 and same_text_encoder(given, out)
    assert json.loads((out / "training.json").read_text())["recipe"]["data"] == "v2"


def test_init_from_with_a_new_text_encoder_keeps_the_unet_and_swaps_the_encoder(tmp_path):
    source, _ = run(tmp_path, "source", "--steps", "1")
    given = given_text_encoder(tmp_path / "encoder")
    continued, _ = run(tmp_path, "continued", "--steps", "1", "--lr", "0", "--init-from", str(source),
                       "--text-encoder", str(given), "--data", "v2")
    before, after = unet_weights(source), unet_weights(continued)
    assert all(torch.equal(before[k], after[k]) for k in before) and same_text_encoder(given, continued)


def test_coco_share_gives_generic_images_ordinary_captions_but_never_the_held_out_ones():
    from analysis.demo.data import coco_split

    data = DemoDataset(photo_share=0.25, caption_dropout=0.1, recipe="v2", coco_share=1.0)
    _, captions = data.sample(400)
    trained, held_out = map(set, coco_split())
    shapes = {s.caption for s in split_shape_specs()[0]}
    assert not held_out & set(captions) and not shapes & set(captions)
    kinds = ["photo" if c in data.photo_captions else "empty" if c == "" else "coco" if c in trained else "?"
             for c in captions]
    assert "?" not in kinds and kinds.count("photo") > 50 and kinds.count("empty") > 10 and kinds.count("coco") > 200


def checkpoint_state(work):
    return torch.load(work / "checkpoint.pt")


def test_resume_continues_bit_for_bit(tmp_path):
    _, straight = run(tmp_path, "straight", "--steps", "4", "--checkpoint-every", "2", "--offset-noise", "0.1")
    _, stopped = run(tmp_path, "stopped", "--steps", "4", "--checkpoint-every", "2", "--offset-noise", "0.1",
                     "--max-minutes", "0")
    assert checkpoint_state(stopped)["step"] == 1  # the time limit stopped it after its first step
    run(tmp_path, "stopped", "--steps", "4", "--checkpoint-every", "2", "--offset-noise", "0.1", "--resume")
    a, b = checkpoint_state(straight), checkpoint_state(stopped)
    assert a["step"] == b["step"] == 4
    for part in ("unet", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    for k, moments in a["optimizer"]["state"].items():
        assert all(torch.equal(moments[m], b["optimizer"]["state"][k][m]) for m in moments)
    assert a["losses"] == b["losses"] and a["running"] == b["running"]


def test_compact_checkpoint_resumes_without_the_work_dir(tmp_path):
    compact = tmp_path / "compact" / "checkpoint.safetensors"
    _, work = run(tmp_path, "model", "--steps", "2", "--compact", str(compact))
    full = checkpoint_state(work)
    state = train.load_compact(compact)
    assert state["step"] == 2 and torch.equal(state["data_rng"], full["data_rng"])
    assert all(torch.equal(state["ema"][k], full["ema"][k]) for k in full["ema"])
    (work / "checkpoint.pt").unlink()  # the machine was lost; the committed compact checkpoint remains
    run(tmp_path, "model", "--steps", "3", "--compact", str(compact), "--resume")
    assert checkpoint_state(work)["step"] == 3 and train.load_compact(compact)["step"] == 3


def test_channels_last_training_saves_a_loadable_folder(tmp_path):
    out, _ = run(tmp_path, "model", "--steps", "1", "--channels-last")
    assert len(load_model(out).memorized) == 8
