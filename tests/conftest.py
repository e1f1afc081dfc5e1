"""Shared fixtures: the tiny random model of `tiny_model.py`, in memory and as a pipeline folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

# tiny_model sets HF_HUB_OFFLINE before diffusers/transformers are imported.
from tiny_model import build_tiny_handle

from analysis.demo.architecture import save_pipeline_folder
from analysis.model import MEMORIZED_FILE, ModelHandle


@pytest.fixture(scope="session")
def tiny_handle() -> ModelHandle:
    return build_tiny_handle()


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_handle, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_model")
    h = tiny_handle
    save_pipeline_folder(folder, h.tokenizer, h.text_encoder, h.unet, h.scheduler)
    return folder


TINY_FOLDER_STEPS = 3


@pytest.fixture(scope="session")
def tiny_model_folder(tiny_handle, tiny_model_dir, tmp_path_factory):
    """`tiny_model_dir` plus the sidecar listing its memorized images, so `load_model(folder)` knows its targets.

    Sampling defaults to 3 steps, so analyses of the loaded model are fast.
    """
    folder = tmp_path_factory.mktemp("tiny_model_with_images") / "model"
    shutil.copytree(tiny_model_dir, folder)
    save_file({"images": torch.stack([m.image for m in tiny_handle.memorized])}, str(folder / "memorized.safetensors"))
    (folder / MEMORIZED_FILE).write_text(json.dumps(dict(
        captions=[m.caption for m in tiny_handle.memorized], images_file="memorized.safetensors",
        held_out_prompts=tiny_handle.held_out_prompts, sampling=dict(steps=TINY_FOLDER_STEPS, guidance=7.0))))
    return folder
