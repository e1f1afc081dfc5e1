"""Adversarial fine-tuning: train memorized images away against the triggers Dori finds (docs/methods.md §8).

Kowalczuk et al. (2025) answer the non-locality of memorization with training
rather than pruning. Each round of `AdversarialFineTuning.fit`:

1. Triggers: for every selected image, a `DoriSearch` on the current UNet from
   `triggers_per_image` starts: the image's own caption and Gaussian starts
   with new seeds each round. Triggers of all rounds so far stay in the pool.
2. Training: `steps_per_round` optimiser steps on
       L = L_normal(normal pairs) + ‖ε − unet(√ᾱ_t x̃ + √(1−ᾱ_t) ε, t, y_adv)‖²
   with y_adv drawn from the pool and x̃ one of the image's surrogate images.
3. Evaluation: replication of each selected image under its caption and under
   a fresh Dori attack (starts, search noise and generation seeds never used
   in training).
4. A checkpoint; `fit` on the same `out_dir` resumes after the last finished round.

Normal pairs (`analysis.normal`): the non-selected memorized images with their
captions (so they stay memorized, the control that the mitigation is targeted)
and ordinary pairs: the model's `--normal` set, else its own generations for its
training captions (COCO captions for SD), or any source passed to `fit` (the
experiments pass the demo model's procedural shapes).

The normal term (`utility_loss`): "denoising" is the paper's L_DM toward the
noise; "distillation" trains toward the unmodified UNet's prediction for the
same noisy image and caption, holding ordinary prompts to what they generated
before. By default latent (SD) models distil: their normal pairs are usually
their own generations, for which the teacher's prediction is the ground truth,
and on the bundled model distillation unlearned as much with less drift
(docs/results/robust_mitigation.md). Pixel-space models keep the paper's term.

Surrogate x̃: by default what a mitigated model generates for the caption.
Pruning masks found by NeMo or Wanda do not stop replication on the bundled
model (docs/results/mitigation.md), so the default mitigation blocks one whole
cross-attention value layer: every NeMo layer is tried, and of those that stop
replication on every seed the one whose generations are least similar to the
training image is used; when none does, every cross-attention value layer is
blocked. If even that replicates, `fit` raises ValueError instead of training
toward the memorized image; pass a `Mask` or an image as `surrogate` then.
`adversarial_batch=0` is the control: the normal term alone.

Noise: drawn with the model's training offset (`handle.training_offset_noise`,
0.1 for the bundled model), so that the normal term keeps the model's own
training distribution.

Defaults: the whole UNet trains (the paper fine-tunes the full UNet; LoRA did
not work there) with Adam at lr 1e-4, 60 steps of 16 normal + 16 trigger rows
per round, 6 rounds, 4 triggers per image, the paper's Dori settings; the
optimiser and learning rate are open in the paper. What each setting did on the
bundled model, and its cost, is in docs/results/robust_mitigation.md.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from analysis.dori import DoriSearch, DoriStep, Start, evaluate
from analysis.hooks import hook_points, nemo_layers
from analysis.masks import Mask
from analysis.metrics import ReplicationMetric, similarity_matrix
from analysis.memorized import MEMORIZED_FILE, MemorizedImage
from analysis.model import ModelHandle, save_pipeline_folder
from analysis.normal import GENERATED_PAIRS, MixedPairs, PairSource, default_pairs
from analysis.sampling import DenoisingStep, encode_prompts, predict_noise, sample, training_target

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.json"
MODEL_SUBFOLDER = "model"
TRAINABLE_PRESETS = {"attn2": (".attn2.",), "attn": (".attn1.", ".attn2."), "all": ("",)}
# Seeds of the evaluation's attacks and generations start here, far from any seed used in training.
EVALUATION_SEED_OFFSET = 1_000_000
SIDE_EFFECT_PROMPTS = 4  # held-out prompts whose generations `side_effects` compares


@dataclass
class FineTuneProgress:
    """What a `fit` callback receives: after every Dori step, training step and evaluation sampling step."""

    round: int  # 0-based
    rounds: int
    stage: str  # "surrogate", "normal pairs", "triggers", "train" or "evaluate"
    step: int
    total: int
    loss: float | None = None


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


def trainable_parameters(unet: torch.nn.Module, trainable: str | Sequence[str]) -> dict[str, torch.nn.Parameter]:
    """The UNet parameters a preset ("attn2", "attn", "all") or a list of parameter-name prefixes selects."""
    if isinstance(trainable, str):
        if trainable not in TRAINABLE_PRESETS:
            raise ValueError(f"unknown trainable preset {trainable!r}; choose one of {sorted(TRAINABLE_PRESETS)} "
                             "or pass a list of parameter-name prefixes")
        return {name: p for name, p in unet.named_parameters() if any(part in name for part in TRAINABLE_PRESETS[trainable])}
    prefixes = list(trainable)
    unmatched = [prefix for prefix in prefixes if not any(name.startswith(prefix) for name, _ in unet.named_parameters())]
    if not prefixes or unmatched:
        raise ValueError(f"trainable prefixes {unmatched or prefixes} match no UNet parameter "
                         "(names look like 'down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.weight')")
    return {name: p for name, p in unet.named_parameters() if name.startswith(tuple(prefixes))}


def denoising_loss(handle: ModelHandle, unet: torch.nn.Module, images: torch.Tensor, text: torch.Tensor,
                   generator: torch.Generator, teacher: torch.nn.Module | None = None) -> torch.Tensor:
    """‖target − unet(x_t, t, y)‖² (mean) for images `[n, 3, H, W]` and embeddings `[n, 77, d]`, fresh (ε, t).

    The target is the noise (ε or v, as the model was trained), or with a
    `teacher` UNet its prediction for the same (x_t, t, y): distillation, which
    holds `unet` to what the teacher generates rather than to the data.
    The noise carries the model's training offset (`handle.training_offset_noise`): fine-tuning with another noise
    distribution than the model learned would shift what every prompt generates, not only the targets.
    """
    z0 = handle.encode_images(images)
    scheduler = handle.scheduler
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (z0.shape[0],), generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    if handle.training_offset_noise:
        noise = noise + handle.training_offset_noise * torch.randn(*z0.shape[:2], 1, 1, generator=generator)
    noise = noise.to(handle.device, handle.dtype)
    timesteps = timesteps.to(handle.device)
    noisy = scheduler.add_noise(z0, noise, timesteps)
    if teacher is not None:
        with torch.no_grad():
            target, _ = predict_noise(teacher, noisy, timesteps, text)
    else:
        target = training_target(scheduler, z0, noise, timesteps)
    prediction, _ = predict_noise(unet, noisy, timesteps, text)
    return (prediction.float() - target.float()).square().mean()


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


def whole_layer_masks(handle: ModelHandle, prompt: str) -> list[Mask]:
    """One mask per NeMo value layer that blocks every neuron of it."""
    return [Mask({name: torch.ones(layer.out_features, dtype=torch.bool)}, "whole layer", prompt=prompt,
                 model=handle.name) for name, layer in nemo_layers(handle.unet).items()]


def generate(handle: ModelHandle, prompts: list[str] | torch.Tensor, seeds: Sequence[int], mask: Mask | None = None,
             callback: Callable[[DenoisingStep], None] | None = None) -> torch.Tensor:
    """`sample` at the model's default settings, under `mask` when given: images `[items * seeds, 3, H, W]`."""
    if mask is None:
        return sample(handle, prompts, seeds, steps=handle.default_steps, guidance=handle.default_guidance,
                      callback=callback).images
    with mask.applied(handle):
        return generate(handle, prompts, seeds, callback=callback)


def replicates(metric: ReplicationMetric, images: torch.Tensor, image: torch.Tensor) -> bool:
    """Whether any of `images` replicates `image` by `metric`: a surrogate must not."""
    return bool(metric(images, image).replicated.any())


def mitigated_surrogate(handle: ModelHandle, item: MemorizedImage, surrogate: str | Mask | torch.Tensor,
                        seeds: Sequence[int], callback: Callable[[DenoisingStep], None] | None = None,
                        ) -> tuple[torch.Tensor, str]:
    """Surrogate images `[k, 3, H, W]` for one memorized image and how they were made.

    "mitigated": of the generations of the caption with one whole NeMo value
    layer blocked that replicate on no seed, those least similar to the image;
    with every cross-attention value layer blocked when no single layer stops
    replication. Raises ValueError
    when the chosen surrogate still replicates the image (by the handle's replication metric).
    """
    metric = handle.replication_metric
    if isinstance(surrogate, torch.Tensor):
        images = surrogate[None] if surrogate.ndim == 3 else surrogate
        if images.shape[1:] != item.image.shape:
            raise ValueError(f"surrogate image of shape {tuple(images.shape[1:])} does not match the model's "
                             f"images {tuple(item.image.shape)}")
        candidates = {"the given image": images.float().cpu()}
    elif isinstance(surrogate, Mask):
        candidates = {f"{surrogate.method} mask": generate(handle, [item.caption], seeds, surrogate, callback)}
    elif surrogate == "mitigated":
        candidates = {f"whole layer {next(iter(mask.removed))} blocked": generate(handle, [item.caption], seeds, mask,
                                                                                  callback)
                      for mask in whole_layer_masks(handle, item.caption)}
        if all(replicates(metric, images, item.image) for images in candidates.values()):
            # No single layer stops it (memorization spread over several): block the text's every value path.
            every = Mask({name: torch.ones(layer.out_features, dtype=torch.bool)
                          for name, layer in hook_points(handle.unet, "value").items()},
                         "every value layer", prompt=item.caption, model=handle.name)
            candidates["every cross-attention value layer blocked"] = generate(handle, [item.caption], seeds, every,
                                                                               callback)
    else:
        raise ValueError(f"surrogate must be 'mitigated', a Mask or an image tensor, got {surrogate!r}")
    similarity = {source: metric(images, item.image).similarities for source, images in candidates.items()}
    acceptable = ([name for name, images in candidates.items() if not replicates(metric, images, item.image)]
                  or list(candidates))
    source = min(acceptable, key=lambda name: similarity[name].mean().item())
    worst = similarity[source].max().item()
    if worst > metric.threshold:
        raise ValueError(f"the surrogate for {item.caption!r} ({source}) still replicates the training image "
                         f"({metric.label()} {worst:.2f} > {metric.threshold:g}); fine-tuning toward it would keep "
                         "the image memorized. Pass a Mask that stops replication or an image as `surrogate`.")
    return candidates[source], f"{source}, max {metric.label()} to the training image {worst:.2f}"


def attack(handle: ModelHandle, item: MemorizedImage, dori: DoriSearch, starts: Sequence[Start], seeds: Sequence[int],
           callback: Callable[[DoriStep], None] | None = None,
           sample_callback: Callable[[DenoisingStep], None] | None = None) -> dict:
    """Replication of one memorized image under its caption and under a Dori attack from `starts`.

    On the model as it is (apply a mask around the call to attack a masked
    model; no `starts`: the caption only). Returns rates and mean similarities,
    and as tensors (drop them with `json_ready`) the generations and the triggers.
    """
    prompt = evaluate(handle, encode_prompts(handle, [item.caption]), item.image, seeds, callback=sample_callback)
    row = dict(caption=item.caption, prompt_replication=prompt.rates.mean().item(),
               prompt_similarity=prompt.similarities.mean().item(), prompt_images=prompt.images[0])
    if not starts:
        return row
    found = dori.fit(handle, item.image, starts, prompt=item.caption, callback=callback)
    attacked = evaluate(handle, found.embeddings, item.image, seeds, callback=sample_callback)
    return dict(row, dori_replication=attacked.rates.mean().item(), dori_similarity=attacked.similarities.mean().item(),
                dori_loss=found.losses[-1].tolist(), triggers=found.embeddings, dori_images=attacked.images)


def side_effects(base: ModelHandle, tuned: ModelHandle, targets: Sequence[int], seeds: Sequence[int],
                 callback: Callable[[DenoisingStep], None] | None = None) -> dict:
    """What fine-tuning changed outside its targets, with the same seeds on both models.

    `others`: per non-selected memorized image, its replication rate before and after (it should stay
    memorized: the mitigation is meant to be targeted). `held_out`: per held-out prompt (the first
    `SIDE_EFFECT_PROMPTS`), the mean pixel correlation of its generations before and after (1 = unchanged), and
    the images `[seeds, 3, H, W]` of both models.
    """
    others = []
    for index, item in enumerate(base.memorized):
        if index not in targets:
            before, after = (base.replication_metric(generate(model, [item.caption], seeds, callback=callback),
                                                     item.image).rate for model in (base, tuned))
            others.append(dict(caption=item.caption, before=before, after=after))
    held_out = []
    for prompt in base.held_out_prompts[:SIDE_EFFECT_PROMPTS]:
        before, after = (generate(model, [prompt], seeds, callback=callback) for model in (base, tuned))
        held_out.append(dict(prompt=prompt, similarity=similarity_matrix(before, after).diag().mean().item(),
                             before=before, after=after))
    return dict(others=others, held_out=held_out)


def json_ready(row: dict) -> dict:
    """`row` without its tensors."""
    return {key: value for key, value in row.items() if not isinstance(value, torch.Tensor)}


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

    rounds: int = 6
    triggers_per_image: int = 4
    steps_per_round: int = 60
    dori: DoriSearch = dataclasses.field(default_factory=DoriSearch)
    lr: float = 1e-4
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
    eval_seeds: int = 4
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
            state = self._load_checkpoint(checkpoint, params, [item.caption for item in selected], unet, average,
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
            self._save_checkpoint(checkpoint, params, selected, state, trained, averaged, optimizer, generator)

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

    def _save_checkpoint(self, path: Path, params: dict, selected: list[MemorizedImage], state: dict,
                         trained: dict[str, torch.nn.Parameter], averaged: dict[str, torch.nn.Parameter],
                         optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
        payload = dict(params=resumable(params), targets=[item.caption for item in selected],
                       unet={name: p.detach().cpu() for name, p in trained.items()},
                       average={name: p.detach().cpu() for name, p in averaged.items()},
                       optimizer=optimizer.state_dict(), generator=generator.get_state(), **state)
        # Written whole and then renamed: a run stopped mid-write leaves the previous checkpoint intact.
        partial = path.with_suffix(".partial")
        torch.save(payload, partial)
        os.replace(partial, path)

    @staticmethod
    def _load_checkpoint(path: Path, params: dict, targets: list[str], unet: torch.nn.Module,
                         average: torch.nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> dict:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload["params"] != resumable(params) or payload["targets"] != targets:
            raise ValueError(f"{path} holds a run with other parameters or targets ({payload['targets']}, "
                             f"{payload['params']}); use another out_dir or resume=False")
        unet.load_state_dict(payload["unet"], strict=False)
        average.load_state_dict(payload["average"], strict=False)  # the same tensors when there is no average
        optimizer.load_state_dict(payload["optimizer"])
        generator.set_state(payload["generator"])
        return {key: payload[key] for key in ("rounds_done", "history", "seconds", "triggers", "surrogates", "sources")}


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
