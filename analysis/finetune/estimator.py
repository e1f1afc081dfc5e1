"""The estimator: `AdversarialFineTuning` and its rounds of trigger search, training and evaluation."""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from analysis.dori import DoriSearch, DoriStep, Start
from analysis.finetune.evaluation import EVALUATION_SEED_OFFSET, attack, json_ready
from analysis.finetune.saving import (CHECKPOINT_FILE, HISTORY_FILE, MODEL_SUBFOLDER, load_checkpoint,
                                      save_checkpoint, save_model_folder)
from analysis.finetune.surrogate import mitigated_surrogate
from analysis.finetune.training import denoising_loss, trainable_parameters
from analysis.limits import MAX_FINETUNE_ROUNDS, MAX_FINETUNE_STEPS, MAX_SEEDS, MAX_STARTS
from analysis.masks import Mask
from analysis.memorized import MemorizedImage
from analysis.model import ModelHandle
from analysis.normal import GENERATED_PAIRS, MixedPairs, PairSource, default_pairs
from analysis.sampling import DenoisingStep, encode_prompts
from analysis.settings import real, whole


@dataclass
class FineTuneProgress:
    """What a `fit` callback receives: after every Dori step, training step and evaluation sampling step."""

    round: int  # 0-based
    rounds: int
    stage: str  # "surrogate", "normal pairs", "triggers", "train", "evaluate" or (`FineTuneRound`) "finished"
    step: int
    total: int
    loss: float | None = None


@dataclass
class FineTuneRound(FineTuneProgress):
    """What a `fit` callback receives when a round has finished and is saved (stage "finished"): its history
    record (the same as `FineTuneResult.history`'s), so that a caller can show each round as it lands."""

    record: dict = dataclasses.field(default_factory=dict)


@dataclass
class FineTuneResult:
    model_dir: Path  # a pipeline folder that `analysis.model.load_model` opens
    targets: list[str]  # captions of the selected images
    history: list[dict]  # one JSON-ready record per round
    surrogates: dict[str, torch.Tensor]  # caption -> surrogate images [k, 3, H, W]
    surrogate_sources: dict[str, str]  # caption -> how its surrogate was made
    params: dict
    seconds: float  # wall time of all rounds, over resumed runs
    normal_pairs: str | None  # where the ordinary pairs came from (None: the non-selected memorized images only)
    utility_loss: str  # the normal term used (`utility_loss`, or the model's default)


def resolve_targets(handle: ModelHandle, targets: Sequence[int | str]) -> list[int]:
    """Indices into `handle.memorized` of targets given as indices or captions; ValueError for bad ones."""
    if isinstance(targets, (str, int)):
        targets = [targets]
    if not targets:
        raise ValueError("no targets given: pass indices or captions of the model's memorized images")
    captions = [item.caption for item in handle.memorized]
    indices = []
    for target in targets:
        if isinstance(target, str):
            if target not in captions:
                raise ValueError(f"{target!r} is not the caption of a memorized image of this model; it has {captions}")
            indices.append(captions.index(target))
        elif isinstance(target, int) and 0 <= target < len(captions):
            indices.append(target)
        else:
            raise ValueError(f"target {target!r} does not exist: the model has {len(captions)} memorized images")
    if len(set(indices)) != len(indices):
        raise ValueError(f"targets {list(targets)} name the same image twice")
    return indices


@dataclass
class AdversarialFineTuning:
    """Fine-tune the UNet so that neither a memorized image's caption nor Dori's triggers reproduce it.

    `dori`: the search that collects triggers (its seed is replaced per round
    and image). `trainable`: "attn2" (cross-attention), "attn", "all" or
    parameter-name prefixes. `normal_batch` / `adversarial_batch`: rows of
    L_DM's and of the trigger term's batch per step; `adversarial_batch=0` is
    the control that fine-tunes on L_DM alone (no surrogates, no triggers), to
    tell what the trigger term costs from what any fine-tuning costs.
    `utility_loss`: the normal rows' term, "denoising" (L_DM toward the noise,
    the paper's) or "distillation" (toward the unmodified UNet's prediction for
    the same noisy image and caption; one more UNet forward per step); None:
    distillation for latent models, denoising for pixel-space ones (module
    docstring). `normal_images`: how many of its own generations a model without
    a `--normal` set trains on as ordinary pairs. `mixed_precision`: the
    training passes run in bfloat16 (autocast) while the weights and Adam's
    state stay float32; `gradient_checkpointing`: the UNet recomputes its
    activations in the backward pass (less memory, slower); the two let SD
    v1.4's UNet train on one GPU. `ema_decay`: when set
    (e.g. 0.99), an exponential moving average of the trained weights is the
    model that Dori attacks, the evaluation measures and `fit` saves, as the
    bundled model's own training ships its EMA; the raw weights keep training.
    None (the paper's) uses the raw weights. `photo_share`: share of
    the normal rows that are non-selected memorized images. `surrogate`: "mitigated", a `Mask` or an image `[3, H, W]`;
    `surrogate_seeds`: generations per image when it is generated.
    `eval_starts`: starts of each round's fresh attack (the caption and random
    ones); `eval_seeds`: generations per embedding in the evaluation.
    """

    rounds: int = whole(6, "rounds of trigger search, training and evaluation", 1, MAX_FINETUNE_ROUNDS)
    triggers_per_image: int = whole(4, "Dori triggers searched per image and round", 1, MAX_STARTS)
    steps_per_round: int = whole(60, "training steps per round", 1, MAX_FINETUNE_STEPS)
    dori: DoriSearch = dataclasses.field(default_factory=DoriSearch)
    lr: float = real(1e-4, "the optimiser's learning rate", 0)
    optimizer: str = "adam"
    trainable: str | list[str] = "all"
    normal_batch: int = 16
    adversarial_batch: int = 16
    utility_loss: str | None = None
    normal_images: int = GENERATED_PAIRS
    ema_decay: float | None = None
    mixed_precision: bool = False
    gradient_checkpointing: bool = False
    photo_share: float = 0.25
    surrogate: str | Mask | torch.Tensor = "mitigated"
    surrogate_seeds: int = 4
    eval_starts: int = 2
    eval_seeds: int = whole(4, "generations per embedding in each round's evaluation", 1, MAX_SEEDS)
    seed: int = 0

    def get_params(self) -> dict:
        """The constructor's arguments, JSON-ready (a surrogate image or mask is described, not stored)."""
        params = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        params["dori"] = dataclasses.asdict(self.dori)
        if isinstance(self.surrogate, torch.Tensor):
            params["surrogate"] = f"image {list(self.surrogate.shape)}"
        elif isinstance(self.surrogate, Mask):
            params["surrogate"] = f"{self.surrogate.method} mask for {self.surrogate.prompt!r}"
        return params

    @classmethod
    def from_params(cls, params: dict) -> AdversarialFineTuning:
        """The inverse of `get_params` (e.g. from JSON). A surrogate image or mask is not stored: pass it again."""
        params = dict(params)
        if "dori" in params:
            params["dori"] = DoriSearch(**params["dori"])
        if params.get("surrogate", "mitigated") != "mitigated":
            raise ValueError(f"surrogate {params['surrogate']!r} cannot be rebuilt from parameters: "
                             "construct the fine-tuning with the image or Mask itself")
        unknown = set(params) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown fine-tuning parameters {sorted(unknown)}")
        return cls(**params)

    def _check(self, handle: ModelHandle) -> None:
        for name in ("rounds", "triggers_per_image", "steps_per_round", "surrogate_seeds", "eval_seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if min(self.normal_batch, self.adversarial_batch, self.eval_starts) < 0:
            raise ValueError(f"normal_batch, adversarial_batch and eval_starts must be >= 0, got {self.normal_batch}, "
                             f"{self.adversarial_batch}, {self.eval_starts}")
        if self.normal_batch + self.adversarial_batch == 0:
            raise ValueError("normal_batch and adversarial_batch are both 0: nothing to train on")
        if not 0 <= self.photo_share <= 1:
            raise ValueError(f"photo_share must be in [0, 1], got {self.photo_share}")
        if self.utility_loss not in (None, "denoising", "distillation"):
            raise ValueError(f"unknown utility_loss {self.utility_loss!r}; choose 'denoising', 'distillation' or "
                             "None (the model's default)")
        if self.normal_images < 1:
            raise ValueError(f"normal_images must be at least 1, got {self.normal_images}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose 'adam', 'adamw' or 'sgd'")
        if handle.dtype != torch.float32:
            raise ValueError(f"fine-tuning needs a float32 model (small updates vanish in lower precision), "
                             f"got {handle.dtype}")

    def _optimizer(self, parameters: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(parameters, lr=self.lr)
        # PyTorch's fused Adam kernels: one launch per step instead of one per tensor, on CUDA.
        adam = torch.optim.Adam if self.optimizer == "adam" else torch.optim.AdamW
        return adam(parameters, lr=self.lr, fused=device.type == "cuda")

    def fit(self, handle: ModelHandle, targets: Sequence[int | str], out_dir: str | Path,
            callback: Callable[[FineTuneProgress], None] | None = None, resume: bool = True,
            normal: PairSource | None = None) -> FineTuneResult:
        """Fine-tune a copy of `handle`'s UNet (the handle is left unchanged) and save it under `out_dir/model`.

        `targets`: indices or captions of `handle.memorized`. `callback` may
        raise `analysis.sampling.SamplingCancelled` to stop; finished rounds
        stay checkpointed in `out_dir`, and with `resume` a later `fit` with the
        same parameters and targets continues after them. `normal`: the ordinary
        pairs beside the non-selected memorized images (default:
        `analysis.normal.default_pairs`, made with progress before the first round).
        """
        self._check(handle)
        indices = resolve_targets(handle, targets)
        selected = [handle.memorized[i] for i in indices]
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        params = self.get_params()

        unet = copy.deepcopy(handle.unet)  # the weights the optimiser steps
        # What is attacked, evaluated and saved: the raw weights, or their moving average.
        average = unet if self.ema_decay is None else copy.deepcopy(unet)
        tuned = dataclasses.replace(handle, unet=average)
        trained = trainable_parameters(unet, self.trainable)
        averaged = trainable_parameters(average, self.trainable)
        optimizer = self._optimizer(list(trained.values()), handle.device)
        generator = torch.Generator().manual_seed(self.seed)
        state = dict(rounds_done=0, history=[], seconds=0.0, triggers={}, surrogates={}, sources={})
        checkpoint = out_dir / CHECKPOINT_FILE
        if resume and checkpoint.is_file():
            state = load_checkpoint(checkpoint, params, [item.caption for item in selected], unet, average,
                                          optimizer, generator)

        def report(round_index: int, stage: str) -> Callable:
            def on_step(step: DoriStep | DenoisingStep) -> None:
                loss = step.loss.mean().item() if isinstance(step, DoriStep) else None
                if callback is not None:
                    callback(FineTuneProgress(round_index, self.rounds, stage, step.index, step.total, loss))
            return on_step

        for item in selected if self.adversarial_batch else []:
            if item.caption not in state["surrogates"]:
                images, source = mitigated_surrogate(handle, item, self.surrogate, range(self.surrogate_seeds),
                                                     report(0, "surrogate"))
                state["surrogates"][item.caption], state["sources"][item.caption] = images, source

        if normal is None and self.normal_batch:
            def on_pair(done: int, total: int) -> None:
                if callback is not None:
                    callback(FineTuneProgress(0, self.rounds, "normal pairs", done - 1, total))

            normal = default_pairs(handle, self.normal_images, on_pair)
        normal_pairs = MixedPairs([m for i, m in enumerate(handle.memorized) if i not in indices], normal,
                                  self.photo_share)
        utility_loss = self.utility_loss or ("denoising" if handle.pixel_space else "distillation")
        for round_index in range(state["rounds_done"], self.rounds):
            started = time.time()
            unet.requires_grad_(False)
            for j, item in enumerate(selected if self.adversarial_batch else []):
                base = self.seed + 1000 * (round_index * len(selected) + j)
                starts = [Start.prompt(item.caption)] + [Start.random(base + i) for i in range(1, self.triggers_per_image)]
                found = dataclasses.replace(self.dori, seed=base).fit(tuned, item.image, starts, prompt=item.caption,
                                                                      callback=report(round_index, "triggers"))
                pool = state["triggers"].get(item.caption)
                state["triggers"][item.caption] = found.embeddings if pool is None else torch.cat([pool, found.embeddings])

            teacher = handle.unet if utility_loss == "distillation" else None
            losses = self._train(tuned, unet, teacher, trained, averaged, optimizer, generator, normal_pairs, selected,
                                 state, round_index, callback)
            record = dict(round=round_index, normal_loss=losses[0], adversarial_loss=losses[1],
                          train_seconds=round(time.time() - started, 1), targets=[])
            for j, item in enumerate(selected):
                base = EVALUATION_SEED_OFFSET + 1000 * (round_index * len(selected) + j)
                starts = [Start.prompt(item.caption)] + [Start.random(base + i) for i in range(1, self.eval_starts)]
                row = attack(tuned, item, dataclasses.replace(self.dori, seed=base), starts[:self.eval_starts],
                             range(EVALUATION_SEED_OFFSET, EVALUATION_SEED_OFFSET + self.eval_seeds),
                             report(round_index, "evaluate"), report(round_index, "evaluate"))
                record["targets"].append(json_ready(row))
            record["seconds"] = round(time.time() - started, 1)
            state["history"].append(record)
            state["rounds_done"] = round_index + 1
            state["seconds"] += record["seconds"]
            save_checkpoint(checkpoint, params, selected, state, trained, averaged, optimizer, generator)
            if callback is not None:
                callback(FineTuneRound(round_index, self.rounds, "finished", 0, 1, record=record))

        model_dir = out_dir / MODEL_SUBFOLDER
        save_model_folder(tuned, model_dir, dict(params=params, targets=[item.caption for item in selected],
                                                 surrogate_sources=state["sources"], history=state["history"],
                                                 normal_pairs=None if normal is None else normal.description,
                                                 utility_loss=utility_loss))
        (out_dir / HISTORY_FILE).write_text(json.dumps(dict(params=params, surrogate_sources=state["sources"],
                                                             history=state["history"]), indent=1))
        return FineTuneResult(model_dir=model_dir, targets=[item.caption for item in selected],
                              history=state["history"], surrogates=state["surrogates"],
                              surrogate_sources=state["sources"], params=params, seconds=round(state["seconds"], 1),
                              normal_pairs=None if normal is None else normal.description, utility_loss=utility_loss)

    def _train(self, tuned: ModelHandle, unet: torch.nn.Module, teacher: torch.nn.Module | None,
               trained: dict[str, torch.nn.Parameter], averaged: dict[str, torch.nn.Parameter],
               optimizer: torch.optim.Optimizer, generator: torch.Generator, normal: PairSource,
               selected: list[MemorizedImage], state: dict, round_index: int,
               callback: Callable[[FineTuneProgress], None] | None) -> tuple[list[float], list[float]]:
        """One round's optimiser steps (the normal term distilled from `teacher` when given), each followed by the
        moving average's update when `ema_decay` is set; returns the normal and
        adversarial loss of every step."""
        for parameter in trained.values():
            parameter.requires_grad_(True)
        unet.train()
        if self.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        normal_losses, adversarial_losses = [], []
        # The weights and the optimiser's state stay float32 (the master weights); only the passes run in bfloat16.
        passes = torch.autocast(tuned.device.type, dtype=torch.bfloat16, enabled=self.mixed_precision)
        try:
            with torch.enable_grad(), passes:
                for step in range(self.steps_per_round):
                    loss = adversarial = torch.zeros(())
                    if self.adversarial_batch:
                        adversarial = self._trigger_loss(tuned, unet, generator, selected, state)
                        loss = adversarial
                    normal_loss = torch.zeros(())
                    if self.normal_batch:
                        images, captions = normal.sample(self.normal_batch, generator)
                        normal_loss = denoising_loss(tuned, unet, images, encode_prompts(tuned, captions), generator,
                                                     teacher)
                        loss = loss + normal_loss
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if self.ema_decay is not None:
                        with torch.no_grad():
                            for name, parameter in trained.items():
                                averaged[name].lerp_(parameter, 1 - self.ema_decay)
                    normal_losses.append(normal_loss.item())
                    adversarial_losses.append(adversarial.item())
                    if callback is not None:
                        callback(FineTuneProgress(round_index, self.rounds, "train", step, self.steps_per_round,
                                                  loss.item()))
        finally:
            if self.gradient_checkpointing:
                unet.disable_gradient_checkpointing()
            unet.eval().requires_grad_(False)
        return normal_losses, adversarial_losses

    def _trigger_loss(self, tuned: ModelHandle, unet: torch.nn.Module, generator: torch.Generator,
                      selected: list[MemorizedImage], state: dict) -> torch.Tensor:
        """L_DM toward the surrogates on `adversarial_batch` triggers drawn from every selected image's pool."""
        triggers = torch.cat([state["triggers"][item.caption] for item in selected])
        owner = torch.cat([torch.full((len(state["triggers"][item.caption]),), j) for j, item in enumerate(selected)])
        rows = torch.randint(len(triggers), (self.adversarial_batch,), generator=generator)
        surrogates = torch.stack([
            state["surrogates"][selected[j].caption][
                torch.randint(len(state["surrogates"][selected[j].caption]), (1,), generator=generator)][0]
            for j in owner[rows].tolist()])
        return denoising_loss(tuned, unet, surrogates, triggers[rows].to(tuned.device, tuned.dtype), generator)
