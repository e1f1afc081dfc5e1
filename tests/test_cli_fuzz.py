"""Every `dori` command with bad values: exit code 2, one line on stderr, no traceback, no model work (a UNet
forward fails the test), no download, nothing written outside the test's temporary folder.

The command line's `main` is called in-process, on the tiny model folder (loaded once per set of options).
"""

from __future__ import annotations

import csv
import json
import os
import zipfile

import pytest
from diffusers import UNet2DConditionModel

import analysis.fetch
import analysis.model
from analysis.cli import main
from analysis.paths import REPO_ROOT


class ModelWork(AssertionError):
    """Raised by a UNet forward during the fuzz: a bad value reached real model work."""


@pytest.fixture()
def files(tmp_path, tiny_model_folder):
    """The files the bad values name: a folder, a file that is no mask, a prompt list with a field over csv's limit
    and one whose rows share an Index, a ZIP that is none, a finetune folder with a broken checkpoint."""
    (tmp_path / "a folder").mkdir()
    (tmp_path / "not-a-mask.safetensors").write_bytes(b"not a mask")
    (tmp_path / "not-a-zip.zip").write_bytes(b"not a zip")
    with open(tmp_path / "oversized.csv", "w", newline="") as file:
        csv.writer(file).writerows([["prompt"], ["x" * (csv.field_size_limit() + 1)]])
    (tmp_path / "duplicates.csv").write_text("Caption;URL;type;Index\na;http://127.0.0.1:9/a.png;VM;1\n"
                                             "b;http://127.0.0.1:9/b.png;VM;1\n")
    with zipfile.ZipFile(tmp_path / "dtype.zip", "w") as archive:
        archive.writestr("config.json", json.dumps(dict(format=1, kind="replicate", model=str(tiny_model_folder),
                                                        config=dict(image=0, seeds=[0], dtype=["x"]))))
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    return tmp_path


# (command, bad arguments, words of the message). {t} is the test's temporary folder.
CASES = [
    ((), "the following arguments are required"),
    (("bogus",), "invalid choice"),
    (("replicate", "--image", "9"), "image must be a whole number from 0 to 1"),
    (("replicate", "--image", "0", "--seeds", "0-99999"), "seeds"),
    (("replicate", "--image", "0", "--seeds", "zero"), "seeds must look like"),
    (("replicate", "--image", "0", "--steps", "0"), "--steps"),
    (("replicate", "--image", "0", "--steps", "100000"), "--steps"),
    (("replicate", "--image", "0", "--guidance", "nan"), "--guidance"),
    (("replicate", "--image", "0", "--threshold", "inf"), "--threshold"),
    (("replicate", "--image", "0", "--device", "cuda:99"), "device cuda:99"),
    (("replicate", "--image", "0", "--device", "garbage"), "unknown device"),
    (("replicate", "--image", "0", "--dtype", "float64"), "unknown dtype"),
    (("replicate", "--image", "0", "--mask", "{t}/not-a-mask.safetensors"), "is not a mask file"),
    (("replicate", "--image", "0", "--mask", "{t}/nowhere.safetensors"), "no mask file"),
    (("replicate", "--image", "0", "--out", "{t}/a folder"), "give a file name"),
    (("replicate", "--image", "0", "--export", "{t}/a folder"), "give a file name"),
    (("replicate", "--image", "0", "--out", "{t}/not-a-zip.zip/r.json"), "give a file name"),
    (("replicate", "--prompt", "a red\x00lighthouse"), "control characters"),
    (("replicate", "--prompt", "a red\nlighthouse"), "control characters"),
    (("replicate", "--prompt", "x" * 2000), "at most 1000"),
    (("replicate", "--image", "0", "--mitigation", "wanda", "--param", "sparsity=nan"), "sparsity"),
    (("replicate", "--image", "0", "--mitigation", "wanda", "--param", "sparsity=NaN"), "finite number"),
    (("replicate", "--image", "0", "--mitigation", "wanda", "--param", "sparsity=[1,2]"), "finite number"),
    (("replicate", "--image", "0", "--mitigation", "nemo", "--param", "refine=3"), "true or false"),
    (("replicate", "--image", "0", "--param", "noequals"), "KEY=VALUE"),
    (("replicate", "--image", "0", "--param", "sparsity=0.1"), "--param needs --mitigation"),
    (("replicate", "--image", "0", "--memorized", "{t}/nowhere"), "no memorized set folder"),
    (("replicate", "--image", "0", "--reference-prompts", "{t}/oversized.csv"), "field larger than field limit"),
    (("replicate", "--image", "0", "--sscd", "{t}/nowhere.pt"), "sscd"),
    (("replicate", "--image", "0", "--sscd-threshold", "0.5"), "--sscd-threshold needs --sscd"),
    (("replicate", "--image", "0", "--model", "{t}/nowhere"), "no model folder"),
    (("localize", "--image", "0", "--method", "bogus"), "invalid choice"),
    (("localize", "--image", "0", "--seeds", "0-1000"), "seeds"),
    (("localize", "--image", "0", "--param", "sparsity=inf"), "sparsity"),
    (("localize", "--image", "0", "--save-mask", "{t}/a folder"), "give a file name"),
    (("attack", "--image", "0", "--random-starts", "100000"), "--random-starts"),
    (("attack", "--image", "0", "--start-seed", "-1"), "--start-seed"),
    (("attack", "--image", "0", "--search-steps", "100000"), "--search-steps"),
    (("attack", "--image", "0", "--batch-size", "0"), "--batch-size"),
    (("attack", "--image", "0", "--lr", "nan"), "--lr"),
    (("attack", "--prompt", "a cat"), "needs a target image"),
    (("sweep", "--image", "0", "--radii", "a,b"), "expected numbers"),
    (("sweep", "--image", "0", "--radii", "nan"), "finite"),
    (("sweep", "--image", "0", "--directions", "0"), "--directions"),
    (("attribute", "--image", "0", "--method", "bogus"), "invalid choice"),
    (("attribute", "--image", "0", "--method", "integrated_gradients", "--param", "n_steps=nan"), "n_steps"),
    (("finetune", "--targets", "x", "--out-dir", "{t}/ft"), "seeds must look like"),
    (("finetune", "--targets", "0", "--out-dir", "/proc/1"), "cannot write there"),
    (("finetune", "--targets", "0", "--out-dir", "{t}/ft2", "--param", "bogus=1"), "unknown finetune parameter"),
    (("finetune", "--targets", "0", "--out-dir", "{t}/ft", "--resume"), "is not a checkpoint"),
    (("triggers", "--image", "0", "--folder", "{t}/tr", "--count", "1000000000"), "--count"),
    (("triggers", "--image", "0", "--folder", "{t}/tr", "--count", "0"), "--count"),
    (("triggers", "--image", "0", "--folder", "/proc/1"), "cannot write there"),
    (("triggers", "--image", "9", "--folder", "{t}/tr"), "--image 9 does not exist"),
    (("triggers", "--image", "0", "--folder", "{t}/tr", "--starts-per-batch", "0"), "--starts-per-batch"),
    (("triggers", "--image", "0", "--folder", "{t}/tr", "--seed", "-5"), "--seed"),
    (("triggers", "--image", "0", "--folder", "{t}/tr", "--evaluation-seeds", "0-100"), "seeds"),
    (("map", "--folder", "{t}/nowhere"), "no trigger set"),
    (("map", "--folder", "{t}/tr", "--method", "bogus"), "invalid choice"),
    (("discrepancy", "--folder", "{t}/tr", "--count", "1"), "--count"),
    (("discrepancy", "--folder", "{t}/tr", "--count", "100000"), "--count"),
    (("discrepancy", "--folder", "{t}/tr", "--layers", "bogus"), "invalid choice"),
    (("discrepancy", "--folder", "{t}/tr", "--steps", "0"), "--steps"),
    (("agreement", "--folder", "{t}/tr", "--count", "100000"), "--count"),
    (("agreement", "--folder", "{t}/tr", "--seeds", "0-1000"), "seeds"),
    (("attention", "--image", "0", "--trigger", "0"), "give --folder and --trigger together"),
    (("attention", "--image", "0", "--folder", "{t}", "--trigger", "-1"), "--trigger"),
    (("attention", "--image", "0", "--folder", "{t}", "--trigger", "0"), "no trigger set"),
    (("attention", "--image", "0", "--denoising-steps", "zero"), "seeds must look like"),
    (("timeline", "--image", "0", "--seed", "-1"), "--seed"),
    (("detect", "--image", "0", "--seeds", "0-1000"), "seeds"),
    (("reference", "--steps", "0"), "--steps"),
    (("reference", "--guidance", "inf"), "--guidance"),
    (("campaign", "--out-dir", "{t}/c", "--limit", "-1"), "--limit"),
    (("campaign", "--out-dir", "{t}/c", "--limit", "0"), "--limit"),
    (("campaign", "--out-dir", "/proc/1"), "cannot write there"),
    (("campaign", "--out-dir", "{t}/c", "--prompts", "{t}/nowhere.csv"), "nowhere.csv"),
    (("campaign", "--out-dir", "{t}/c", "--workers", "0"), "--workers"),
    (("rerun", "{t}/nowhere.zip"), "no export file"),
    (("rerun", "{t}/not-a-zip.zip"), "not a ZIP"),
    (("rerun", "{t}/dtype.zip"), "unknown dtype"),
    (("rerun", "{t}/dtype.zip", "--device", "garbage"), "unknown device"),
    (("memorized", "fetch", "--folder", "{t}/f", "--max-mb", "inf"), "--max-mb"),
    (("memorized", "fetch", "--folder", "{t}/f", "--timeout", "nan"), "--timeout"),
    (("memorized", "fetch", "--folder", "{t}/f", "--timeout", "1e300"), "--timeout"),
    (("memorized", "fetch", "--folder", "{t}/f", "--retries", "-1"), "--retries"),
    (("memorized", "fetch", "--folder", "/proc/1"), "cannot write there"),
    (("memorized", "fetch", "--folder", "{t}/f", "--prompts", "{t}/duplicates.csv"), "rows 1 and 2"),
    (("memorized",), "the following arguments are required"),
    (("replicate", "--image", "0", "--mitigation", "nemo", "--param", "scales=1", "--param", "threshold=abc"),
     "threshold"),
    (("replicate", "--image", "0", "--mitigation", "nemo", "--param", "scales=1", "--param", "layers=abc"), "layers"),
    (("replicate", "--image", "0", "--mitigation", "nemo", "--param", "scales=1", "--param", "reference_prompts=abc"),
     "reference_prompts"),
    (("attribute", "--image", "0", "--param", "seeds=abc"), "seeds"),
    (("finetune", "--targets", "0", "--out-dir", "{t}/ft3", "--param", "rounds=abc"), "rounds"),
    (("finetune", "--targets", "0", "--out-dir", "{t}/ft3", "--param", "lr=nan"), "lr"),
    (("finetune", "--targets", "5", "--out-dir", "{t}/ft3"), "target 5 does not exist"),
    (("campaign", "--out-dir", "{t}/c", "--set", "seeds=abc"), "seeds"),
    (("campaign", "--out-dir", "{t}/c", "--method", "bogus"), "bogus"),
    (("sweep", "--image", "0", "--radii", "1e400"), "finite"),
    (("attention", "--image", "0", "--layers", "bogus.layer"), "bogus"),
]
# Commands that take the model options: the tests give the tiny model folder unless a case names its own.
MODEL_COMMANDS = {"replicate", "localize", "attack", "sweep", "attribute", "finetune", "triggers", "map",
                  "discrepancy", "agreement", "attention", "timeline", "detect", "reference", "campaign", "rerun"}


def test_the_fuzz_table_covers_every_command():
    from analysis.cli_parser import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(commands) <= {case[0][0] for case in CASES if case[0]}


def snapshot(folder) -> dict:
    """Every file under `folder` (the repository: its runs folder and anything else) with its modification time."""
    return {str(path): path.stat().st_mtime_ns for path in folder.rglob("*")
            if ".git" not in path.parts and "__pycache__" not in path.parts and path.is_file()}


@pytest.fixture()
def guarded(monkeypatch, files, tiny_model_folder):
    """No UNet forward, no download, a cached tiny model; the working and runs folders inside the temporary one."""
    def no_model_work(*args, **kwargs):
        raise ModelWork("a bad value reached a UNet forward")

    def no_download(*args, **kwargs):
        raise ModelWork("a bad value reached a download")

    loaded, load = {}, analysis.model.load_model

    def load_once(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in loaded:
            loaded[key] = load(*args, **kwargs)
        return loaded[key]

    monkeypatch.setattr(UNet2DConditionModel, "forward", no_model_work)
    monkeypatch.setattr(analysis.fetch, "download", no_download)
    monkeypatch.setattr(analysis.model, "load_model", load_once)
    monkeypatch.chdir(files)
    monkeypatch.setenv("DORI_RUNS_DIR", str(files / "runs"))
    return files


def test_every_bad_value_exits_2_with_one_line(guarded, tiny_model_folder, capsys):
    before = snapshot(REPO_ROOT)
    failures = []
    for args, words in CASES:
        argv = [arg.replace("{t}", str(guarded)) for arg in args]
        if argv[:1] and argv[0] in MODEL_COMMANDS and "--model" not in argv:
            argv += ["--model", str(tiny_model_folder)]
        if argv[:1] and argv[0] in MODEL_COMMANDS or argv[:2] == ["memorized", "fetch"]:
            argv.append("--quiet")
        code = main(argv)
        out, err = capsys.readouterr()
        lines = err.splitlines()
        if code != 2 or len(lines) != 1 or "Traceback" in err or words not in err or out:
            failures.append(f"dori {' '.join(args)[:80]!r}: exit {code}, stderr {err[-300:]!r}, stdout {out[:80]!r}")
    assert not failures, "\n".join(failures)
    assert snapshot(REPO_ROOT) == before
    # The folders the bad commands named were made inside the temporary folder, and left empty (a campaign's
    # folder keeps the header it writes before its first item is checked).
    made = {path.name for path in guarded.iterdir()}
    assert not [name for name in made & {"tr", "f", "ft2", "ft3"} if any(os.scandir(guarded / name))]
