"""What fine-tuning writes: round checkpoints to resume from, and the tuned model as a pipeline folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from analysis.memorized import MEMORIZED_FILE, MemorizedImage
from analysis.model import ModelHandle, save_pipeline_folder

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.json"
MODEL_SUBFOLDER = "model"


def save_checkpoint(path: Path, params: dict, selected: list[MemorizedImage], state: dict,
                    trained: dict[str, torch.nn.Parameter], averaged: dict[str, torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
    """The state after a finished round: trained (and averaged) weights, optimiser, generator, triggers, history."""
    payload = dict(params=resumable(params), targets=[item.caption for item in selected],
                   unet={name: p.detach().cpu() for name, p in trained.items()},
                   average={name: p.detach().cpu() for name, p in averaged.items()},
                   optimizer=optimizer.state_dict(), generator=generator.get_state(), **state)
    # Written whole and then renamed: a run stopped mid-write leaves the previous checkpoint intact.
    partial = path.with_suffix(".partial")
    torch.save(payload, partial)
    os.replace(partial, path)


def load_checkpoint(path: Path, params: dict, targets: list[str], unet: torch.nn.Module, average: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, generator: torch.Generator) -> dict:
    """Restore `save_checkpoint`'s weights, optimiser and generator in place; returns the rest of its state."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        same = payload["params"] == resumable(params) and payload["targets"] == targets
    except Exception as err:  # noqa: BLE001 - torch.load's errors (and a missing key) for a file that is not ours
        raise _not_a_checkpoint(path, err) from err
    if not same:
        raise ValueError(f"{path} holds a run with other parameters or targets ({payload['targets']}, "
                         f"{payload['params']}); use another out_dir or resume=False")
    try:
        unet.load_state_dict(payload["unet"], strict=False)
        average.load_state_dict(payload["average"], strict=False)  # the same tensors when there is no average
        optimizer.load_state_dict(payload["optimizer"])
        generator.set_state(payload["generator"])
        return {key: payload[key] for key in ("rounds_done", "history", "seconds", "triggers", "surrogates",
                                              "sources")}
    except Exception as err:  # noqa: BLE001 - weights of another shape, a missing key
        raise _not_a_checkpoint(path, err) from err


def _not_a_checkpoint(path: Path, err: Exception) -> ValueError:
    return ValueError(f"{path} is not a checkpoint this fine-tuning can resume ({type(err).__name__}); use another "
                      "out_dir or resume=False")


def resumable(params: dict) -> str:
    """What a checkpoint must share with a run to resume it: every setting but the number of rounds."""
    return json.dumps({key: value for key, value in params.items() if key != "rounds"}, sort_keys=True)


def save_model_folder(handle: ModelHandle, folder: Path, finetuning: dict | None = None) -> None:
    """Write `handle` as a pipeline folder with its `memorized.json` sidecar, so that `load_model(folder)` opens it."""
    folder = Path(folder)
    save_pipeline_folder(folder, handle.tokenizer, handle.text_encoder, handle.unet, handle.scheduler,
                         vae=None if handle.pixel_space else handle.codec)
    images_file = "memorized.safetensors"
    save_file({"images": torch.stack([item.image for item in handle.memorized]).contiguous().cpu()},
              str(folder / images_file))
    sidecar = dict(captions=[item.caption for item in handle.memorized], images_file=images_file,
                   sampling=dict(steps=handle.default_steps, guidance=handle.default_guidance),
                   training=dict(offset_noise=handle.training_offset_noise), held_out_prompts=handle.held_out_prompts,
                   train_prompts=handle.train_prompts)
    if finetuning is not None:
        sidecar["adversarial_finetuning"] = finetuning
    (folder / MEMORIZED_FILE).write_text(json.dumps(sidecar, indent=1))
