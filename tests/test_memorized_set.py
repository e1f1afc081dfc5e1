"""Memorized sets (imagefolder and sidecar) and reference prompt lists: loading, and one clear error per bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from tiny_sd import IMAGE_SIZE, REFERENCE_PROMPTS, SET_CAPTIONS, write_metadata_csv

from analysis.memorized import (REFERENCE_PROMPTS_FILE, MemorizedSetError, fit_image, load_memorized_set,
                                read_prompt_list)
from analysis.model import DEMO_MODEL_DIR, load_model


@pytest.fixture(scope="module")
def sd_handle(tiny_sd_folder, memorized_set_dir, reference_prompts_file):
    return load_model(tiny_sd_folder, memorized=memorized_set_dir, reference_prompts=reference_prompts_file)


def test_imagefolder_set_is_loaded_at_the_models_size(sd_handle, memorized_set_dir, reference_prompts_file):
    assert not sd_handle.pixel_space and sd_handle.image_size == IMAGE_SIZE
    assert [m.caption for m in sd_handle.memorized] == SET_CAPTIONS
    # The wide RGB image, centre-cropped and resized; the greyscale one made RGB (its three channels equal).
    first, second = (m.image for m in sd_handle.memorized)
    with Image.open(memorized_set_dir / "image0.png") as picture:
        torch.testing.assert_close(first, fit_image(picture, IMAGE_SIZE))
    assert first.shape == second.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert first.min() >= -1 and first.max() <= 1
    assert torch.equal(second[0], second[1]) and torch.equal(second[1], second[2])
    assert sd_handle.memorized[0].metadata == dict(file_name="image0.png", url="http://127.0.0.1/image0.png")
    assert sd_handle.held_out_prompts == REFERENCE_PROMPTS
    assert sd_handle.data_settings()["memorized_set"] == str(memorized_set_dir.resolve())
    assert sd_handle.data_settings()["reference_prompts"] == str(reference_prompts_file.resolve())


def test_fit_image_crops_the_centre():
    pixels = torch.zeros(10, 30, 3, dtype=torch.uint8)
    pixels[:, 10:20] = 255  # a white centre square between black side bands
    fitted = fit_image(Image.fromarray(pixels.numpy()), 10)
    assert fitted.shape == (3, 10, 10) and fitted.min() > 0.9


def test_jsonl_metadata_and_the_caption_column(tmp_path, sd_handle, memorized_set_dir):
    folder = tmp_path / "set"
    shutil.copytree(memorized_set_dir, folder)
    (folder / "metadata.csv").unlink()
    rows = [dict(file_name="image1.png", caption="the golden retriever on the beach", group="dogs")]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    (loaded,) = load_memorized_set(folder, sd_handle.tokenizer, IMAGE_SIZE)
    assert loaded.caption == rows[0]["caption"] and loaded.metadata["group"] == "dogs"
    torch.testing.assert_close(loaded.image, sd_handle.memorized[1].image)


def test_the_bundled_model_loads_through_the_same_loader():
    handle = load_model(None)
    again = load_memorized_set(DEMO_MODEL_DIR, handle.tokenizer, handle.image_size)
    assert len(handle.memorized) == len(again) == 8 and handle.image_size == 32
    assert all(torch.equal(a.image, b.image) and a.caption == b.caption for a, b in zip(handle.memorized, again))


def test_models_without_reference_prompts_get_the_shipped_ones(tiny_sd_folder):
    handle = load_model(tiny_sd_folder)
    assert handle.held_out_prompts == read_prompt_list(REFERENCE_PROMPTS_FILE) and len(handle.held_out_prompts) == 500
    assert handle.memorized == [] and handle.data_settings()["reference_prompts"] is None


def _bad_set(tmp_path, memorized_set_dir, case):
    folder = tmp_path / "set"
    shutil.copytree(memorized_set_dir, folder)
    if case == "no metadata":
        (folder / "metadata.csv").unlink()
    elif case == "no caption column":
        write_metadata_csv(folder, [["image0.png", "x"]], columns=("file_name", "title"))
    elif case == "missing image":
        write_metadata_csv(folder, [["image0.png", "fine"], ["gone.png", "a caption"]])
    elif case == "undecodable image":
        (folder / "image1.png").write_bytes(b"not an image at all")
    elif case == "empty caption":
        write_metadata_csv(folder, [["image0.png", "fine"], ["image1.png", "  "]])
    elif case == "caption too long":
        write_metadata_csv(folder, [["image0.png", "fine"], ["image1.png", "red " * 100]])
    elif case == "no rows":
        write_metadata_csv(folder, [])
    return folder


@pytest.mark.parametrize("case, message", [
    ("no metadata", r"no metadata.csv or metadata.jsonl"),
    ("no caption column", r"metadata.csv: needs the columns file_name and text or caption; it has \['file_name', 'title'\]"),
    ("missing image", r"metadata.csv row 2: no image file .*gone.png"),
    ("undecodable image", r"metadata.csv row 2: image1.png could not be decoded as an image"),
    ("empty caption", r"metadata.csv row 2: the caption is empty"),
    ("caption too long", r"metadata.csv row 2: the caption has 100 tokens; the text encoder reads at most 75"),
    ("no rows", r"metadata.csv: no rows"),
])
def test_a_bad_set_is_one_clear_error_naming_the_file_and_row(tmp_path, memorized_set_dir, tiny_sd_folder, case,
                                                              message):
    folder = _bad_set(tmp_path, memorized_set_dir, case)
    with pytest.raises(MemorizedSetError, match=message):
        load_model(tiny_sd_folder, memorized=folder)


def test_a_bad_reference_prompt_list_names_the_row(tmp_path, tiny_sd_folder):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt\na fine prompt\n\"\"\n")
    with pytest.raises(ValueError, match="prompts.csv row 2: no prompt"):
        load_model(tiny_sd_folder, reference_prompts=path)
