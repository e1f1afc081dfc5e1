"""Shared fixtures: the tiny random model of `tiny_model.py`, in memory and as a pipeline folder; the tiny latent
SD folders and memorized set of `tiny_sd.py`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

# tiny_model sets HF_HUB_OFFLINE before diffusers/transformers are imported.
from tiny_model import build_tiny_handle
from tiny_sd import build_tiny_sd_folder, write_memorized_set, write_prompt_list, write_sscd_standin

from analysis.memorized import MEMORIZED_FILE
from analysis.model import ModelHandle, save_pipeline_folder


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


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """A tiny latent SD pipeline saved by `StableDiffusionPipeline.save_pretrained` with SD v1.4's PNDM scheduler."""
    return build_tiny_sd_folder(tmp_path_factory.mktemp("tiny_sd") / "model")


@pytest.fixture(scope="session")
def tiny_sd_vpred_folder(tmp_path_factory):
    """The same with a v-prediction scheduler, as SD 2.x at 768 px."""
    return build_tiny_sd_folder(tmp_path_factory.mktemp("tiny_sd_vpred") / "model", v_prediction=True)


@pytest.fixture(scope="session")
def memorized_set_dir(tmp_path_factory):
    """An imagefolder memorized set (images + metadata.csv) for the tiny SD folders."""
    return write_memorized_set(tmp_path_factory.mktemp("memorized") / "set")


@pytest.fixture(scope="session")
def reference_prompts_file(tmp_path_factory):
    """A short non-memorized prompt list, so that NeMo's and Wanda's reference statistics are quick."""
    return write_prompt_list(tmp_path_factory.mktemp("reference") / "prompts.csv")


@pytest.fixture(scope="session")
def sscd_file(tmp_path_factory):
    """A TorchScript stand-in for SSCD's network."""
    return write_sscd_standin(tmp_path_factory.mktemp("sscd") / "sscd_standin.torchscript.pt")
