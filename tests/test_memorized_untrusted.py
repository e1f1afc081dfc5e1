"""Crafted memorized sets: every bad one is one message naming the file (and row), in the engine, the command line
and the app, and nothing outside the set is read or quoted."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from tiny_sd import write_metadata_csv

from analysis import memorized
from analysis.cli import main
from analysis.limits import MAX_SET_ROWS
from analysis.memorized import MEMORIZED_FILE, MemorizedSetError
from analysis.model import load_model
from dori_ui.session import ModelChoices

SECRET = "secret-words-from-outside-the-set"


def imagefolder_case(tmp_path, memorized_set_dir, case):
    folder = tmp_path / "set"
    shutil.copytree(memorized_set_dir, folder)
    (tmp_path / "outside.csv").write_text(f"file_name,text\nimage0.png,{SECRET}\n")
    if case == "field over the CSV limit":
        write_metadata_csv(folder, [["image0.png", "fine"], ["image1.png", "x" * (csv.field_size_limit() + 1)]])
    elif case == "deeply nested JSONL":
        (folder / "metadata.csv").unlink()
        (folder / "metadata.jsonl").write_text(json.dumps(dict(file_name="image0.png", text="fine")) + "\n"
                                               + "[" * 100_000 + "\n")
    elif case == "non-UTF-8 metadata":
        (folder / "metadata.csv").write_bytes(b"file_name,text\nimage0.png,caf\xe9\n")
    elif case == "NUL in a caption":
        write_metadata_csv(folder, [["image0.png", "fine"], ["image1.png", "a photo\x00of a dog"]])
    elif case == "too many rows":
        write_metadata_csv(folder, [["image0.png", f"caption {i}"] for i in range(MAX_SET_ROWS + 1)])
    elif case == "more fields than columns":
        write_metadata_csv(folder, [["image0.png", "fine"], ["image1.png", "a dog", "extra"]])
    elif case == "symlinked metadata":
        (folder / "metadata.csv").unlink()
        (folder / "metadata.csv").symlink_to(tmp_path / "outside.csv")
    elif case == "image outside":
        shutil.copy(memorized_set_dir / "image0.png", tmp_path / "outside.png")
        write_metadata_csv(folder, [["../outside.png", "fine"]])
    return folder


IMAGEFOLDER_CASES = [
    ("field over the CSV limit", r"metadata.csv row 2: not a readable CSV row \(field larger than field limit"),
    ("deeply nested JSONL", r"metadata.jsonl line 2: not a JSON object: nested too deeply"),
    ("non-UTF-8 metadata", r"metadata.csv: not UTF-8 text \(byte 29\)"),
    ("NUL in a caption", r"metadata.csv row 2: the caption holds a NUL character"),
    ("too many rows", rf"metadata.csv: more than {MAX_SET_ROWS} rows; a memorized set holds at most {MAX_SET_ROWS}"),
    ("more fields than columns", r"metadata.csv row 2: more fields than the header has columns"),
    ("symlinked metadata", r"metadata file 'metadata.csv' is not a file inside"),
    ("image outside", r"metadata.csv row 1: image file '../outside.png' is not a file inside"),
]


@pytest.mark.parametrize("case, message", IMAGEFOLDER_CASES)
def test_a_bad_imagefolder_set_is_one_message_in_engine_cli_and_app(tmp_path, memorized_set_dir, tiny_sd_folder,
                                                                    tiny_handle, capsys, case, message):
    folder = imagefolder_case(tmp_path, memorized_set_dir, case)
    with pytest.raises(MemorizedSetError, match=message) as raised:
        load_model(tiny_sd_folder, memorized=folder)
    assert SECRET not in str(raised.value) and len(str(raised.value)) < 400
    capsys.readouterr()  # what loading printed
    assert main(["replicate", "--image", "0", "--quiet", "--model", str(tiny_sd_folder), "--memorized", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dori replicate: error:") and len(err.splitlines()) == 1 and SECRET not in err
    with pytest.raises(ValueError, match=message):  # the app's session loading, which shows it as a gr.Error
        ModelChoices(tiny_handle, allowed_roots=[tmp_path]).with_memorized(tiny_handle, str(folder))


def test_an_image_over_the_pixel_cap_is_refused_before_decoding(tmp_path, memorized_set_dir, tiny_sd_folder,
                                                                monkeypatch):
    monkeypatch.setattr(memorized, "MAX_SET_IMAGE_PIXELS", 100)  # the set's images are 24×40 and 30×20
    with pytest.raises(MemorizedSetError, match=r"metadata.csv row 1: image0.png is 40×24 pixels; a memorized set's "
                                                r"images may have at most 100"):
        load_model(tiny_sd_folder, memorized=memorized_set_dir)


def sidecar_case(tmp_path, tiny_model_folder, case):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_folder, folder)
    sidecar = folder / MEMORIZED_FILE
    meta = json.loads(sidecar.read_text())
    (tmp_path / "outside.json").write_text(json.dumps(dict(captions=[SECRET], images_file="memorized.safetensors")))
    if case == "images_file outside":
        shutil.move(folder / meta["images_file"], tmp_path / "outside.safetensors")
        meta["images_file"] = "../outside.safetensors"
    elif case == "images_file absolute":
        meta["images_file"] = str(tmp_path / "outside.json")
    elif case == "no captions":
        del meta["captions"]
    elif case == "captions of the wrong type":
        meta["captions"] = SECRET
    elif case == "sampling of the wrong type":
        meta["sampling"] = dict(steps=[3])
    elif case == "not safetensors":
        (folder / meta["images_file"]).write_text(SECRET)
    elif case == "non-UTF-8 sidecar":
        sidecar.write_bytes(b'{"captions": ["caf\xe9"]}')
        return folder
    elif case == "symlinked sidecar":
        sidecar.unlink()
        sidecar.symlink_to(tmp_path / "outside.json")
        return folder
    sidecar.write_text(json.dumps(meta))
    return folder


SIDECAR_CASES = [
    ("images_file outside", r"memorized.json: images_file '../outside.safetensors' is not a file inside"),
    ("images_file absolute", r"memorized.json: images_file '/.*outside.json' is not a file inside"),
    ("no captions", r"memorized.json: needs captions \(a list of texts\) and images_file"),
    ("captions of the wrong type", r"memorized.json: needs captions \(a list of texts\) and images_file"),
    ("sampling of the wrong type", r"memorized.json: held_out_prompts and train_prompts must be lists of texts, "
                                   r"sampling \{steps, guidance\}"),
    ("not safetensors", r"memorized.safetensors: not a safetensors file with an 'images' tensor"),
    ("non-UTF-8 sidecar", r"memorized.json: not UTF-8 text \(byte 18\)"),
    ("symlinked sidecar", r"sidecar 'memorized.json' is not a file inside"),
]


@pytest.mark.parametrize("case, message", SIDECAR_CASES)
def test_a_bad_sidecar_is_one_message_and_reads_nothing_outside(tmp_path, tiny_model_folder, tiny_handle, capsys,
                                                                case, message):
    folder = sidecar_case(tmp_path, tiny_model_folder, case)
    with pytest.raises(MemorizedSetError, match=message) as raised:
        load_model(folder)
    assert SECRET not in str(raised.value)
    capsys.readouterr()  # what loading printed
    assert main(["replicate", "--image", "0", "--quiet", "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dori replicate: error:") and len(err.splitlines()) == 1 and SECRET not in err
    if case not in ("sampling of the wrong type",):  # the app reads a set's sidecar through the same loader
        with pytest.raises(ValueError, match=message):
            ModelChoices(tiny_handle, allowed_roots=[tmp_path]).with_memorized(tiny_handle, str(folder))
