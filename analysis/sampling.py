"""The project's one sampling loop: DDIM with classifier-free guidance.

The loop is `denoising_steps`, a generator of `DenoisingStep`s. Everything
that generates images (app, experiments, benchmarks) goes through `sample`,
which runs it to the end and decodes; what is read off the first steps only
(Wen et al.'s score, NeMo's noise difference, activations at the first step)
iterates `denoising_steps` and stops. It reproduces `StableDiffusionPipeline` for the same seeds: one CPU generator
per image draws x_T exactly as `diffusers.utils.torch_utils.randn_tensor`
does, the batch is ordered [unconditional, text] as in the pipeline, and the
scheduler is a fresh `DDIMScheduler` built from the handle's config.

Conditioning is either prompts or text embeddings `[n, 77, d]` (the text
encoder's last hidden state), so optimised embeddings (mitigation, Dori
triggers) are sampled by the same code as prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, SchedulerMixin, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from analysis.model import ModelHandle


class SamplingCancelled(Exception):
    """Raise this from any progress callback to stop a long computation (sampling, a search, a localizer, ...).

    The computation does not catch it: the caller that passed the callback
    does. Hooks and weights are restored on the way out (`analysis.hooks.hooked`).
    """


@dataclass
class DenoisingStep:
    """What a `sample` callback receives after each denoising step. Rows are item-major."""

    index: int  # 0-based step number
    total: int  # number of steps of the run
    timestep: torch.Tensor
    latents: torch.Tensor  # x_t, the UNet's input at this step, [rows, C, h, w]
    # The noise the model predicts, as ε whatever it is trained to predict (`as_epsilon`):
    noise_text: torch.Tensor  # ε(x_t, y)
    noise_uncond: torch.Tensor | None  # ε(x_t, y0); None when guidance == 1 (not evaluated)
    noise_pred: torch.Tensor  # the guided model output the scheduler used (ε, or v for a v-prediction model)
    next_latents: torch.Tensor  # x_{t-1}
    predicted_original: torch.Tensor  # x̂_0, the clean latents the scheduler predicted at this step


@dataclass
class SampleResult:
    images: torch.Tensor  # [n_items * len(seeds), 3, H, W] in [-1, 1], float32, CPU; item-major
    seeds: list[int]
    steps: int
    guidance: float
    # Wen et al.'s magnitude ‖ε(x_T, y) − ε(x_T, y0)‖₂ (ε as `as_epsilon` reads it) of each image at the first
    # step, [rows] float32 CPU; None when guidance == 1 (ε(x_T, y0) is not evaluated).
    wen_first_step: torch.Tensor | None


@torch.no_grad()
def encode_prompts(handle: ModelHandle, prompts: list[str]) -> torch.Tensor:
    """Prompts -> text embeddings `[n, 77, d]` on the handle's device and dtype (as the SD pipeline encodes them)."""
    if isinstance(prompts, str):
        raise TypeError("encode_prompts takes a list of prompts; wrap a single prompt as [prompt]")
    ids = handle.tokenizer(list(prompts), padding="max_length", max_length=handle.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids
    return handle.text_encoder(ids.to(handle.device)).last_hidden_state.to(handle.dtype)


def noise_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, as diffusers pipelines take them: a seed means the same x_T on any device."""
    return [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]


def initial_noise(handle: ModelHandle, generators: list[torch.Generator]) -> torch.Tensor:
    """x_T `[len(generators), C, h, w]` on the handle's device, drawn row by row like `StableDiffusionPipeline`.

    Not yet scaled by the scheduler's `init_noise_sigma` (1 for DDIM).
    """
    return randn_tensor((len(generators), *handle.latent_shape), generator=generators,
                        device=handle.device, dtype=handle.dtype)


def predict_noise(unet: UNet2DConditionModel, latents: torch.Tensor, timestep: torch.Tensor | int,
                  text: torch.Tensor, uncond: torch.Tensor | None = None,
                  batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ε(x_t, y) and, when `uncond` is given, ε(x_t, y0), from one UNet call per chunk of `batch_size` rows.

    `text` has one row per latent; `uncond` one row or one per latent. No
    `torch.no_grad` here, so gradients flow into the embeddings.
    """
    if uncond is not None:
        uncond = uncond.expand_as(text)
    chunk = batch_size or latents.shape[0]
    noise_text, noise_uncond = [], []
    for start in range(0, latents.shape[0], chunk):
        x, y = latents[start:start + chunk], text[start:start + chunk]
        if uncond is None:
            noise_text.append(unet(x, timestep, encoder_hidden_states=y, return_dict=False)[0])
            continue
        # [unconditional, text] in one batch, the order StableDiffusionPipeline uses.
        both = unet(torch.cat([x, x]), timestep, encoder_hidden_states=torch.cat([uncond[start:start + chunk], y]),
                    return_dict=False)[0]
        eps_uncond, eps_text = both.chunk(2)
        noise_text.append(eps_text)
        noise_uncond.append(eps_uncond)
    return torch.cat(noise_text), (torch.cat(noise_uncond) if uncond is not None else None)


def as_epsilon(scheduler: SchedulerMixin, output: torch.Tensor, latents: torch.Tensor,
               timestep: torch.Tensor | int) -> torch.Tensor:
    """The noise ε a UNet output stands for, by the scheduler's `prediction_type`.

    "epsilon": the output itself; "v_prediction" (SD 2.x at 768 px): ε = √ᾱ_t·v + √(1−ᾱ_t)·x_t;
    "sample": ε = (x_t − √ᾱ_t·x̂_0) / √(1−ᾱ_t). `timestep` is one timestep or one per row of `latents`.
    Analyses that compare a prediction with noise (NeMo's δ, Wen et al.'s gap) read ε through this.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return output
    alphas = scheduler.alphas_cumprod.to(latents.device)[torch.as_tensor(timestep, device=latents.device).long()]
    alphas = alphas.view(-1, *[1] * (latents.ndim - 1)).to(latents.dtype) if alphas.ndim else alphas.to(latents.dtype)
    if kind == "v_prediction":
        return alphas.sqrt() * output + (1 - alphas).sqrt() * latents
    if kind == "sample":
        return (latents - alphas.sqrt() * output) / (1 - alphas).sqrt()
    raise ValueError(f"unknown prediction_type {kind!r} in the scheduler's config")


def training_target(scheduler: SchedulerMixin, z0: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to output for x_t = add_noise(z0, noise, t), by the scheduler's `prediction_type`:
    the noise ε, the velocity v = √ᾱ_t·ε − √(1−ᾱ_t)·z0 (SD 2.x at 768 px), or z0 itself ("sample").

    The denoising losses of Dori and of fine-tuning compare the UNet's output with this.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(z0, noise, timesteps)
    if kind == "sample":
        return z0
    raise ValueError(f"unknown prediction_type {kind!r} in the scheduler's config")


def guided_noise(noise_text: torch.Tensor, noise_uncond: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: ε(x_t, y0) + guidance·(ε(x_t, y) − ε(x_t, y0)).

    ε(x_t, y) itself when `noise_uncond` is None.
    """
    return noise_text if noise_uncond is None else noise_uncond + guidance * (noise_text - noise_uncond)


def noise_gap(noise_text: torch.Tensor, noise_uncond: torch.Tensor) -> torch.Tensor:
    """Wen et al.'s magnitude ‖ε(x_t, y) − ε(x_t, y0)‖₂ per image, float32 `[rows]`.

    The L2 norm runs over all latent entries of an image (channels and pixels).
    """
    return (noise_text - noise_uncond).float().flatten(1).norm(dim=1)


def as_embeddings(handle: ModelHandle, conditioning: list[str] | torch.Tensor) -> torch.Tensor:
    """Prompts or embeddings -> embeddings `[n, 77, d]` on the handle's device and dtype."""
    if isinstance(conditioning, torch.Tensor):
        width = handle.unet.config.cross_attention_dim
        if conditioning.ndim != 3 or conditioning.shape[-1] != width:
            raise ValueError(f"embeddings must have shape [n, tokens, {width}], got {tuple(conditioning.shape)}")
        return conditioning.to(handle.device, handle.dtype)
    if isinstance(conditioning, str):
        raise TypeError("conditioning takes a list of prompts; wrap a single prompt as [prompt]")
    if len(conditioning) == 0:
        raise ValueError("no prompts given")
    return encode_prompts(handle, conditioning)


@torch.no_grad()
def denoising_steps(handle: ModelHandle, conditioning: list[str] | torch.Tensor, seeds: Sequence[int],
                    steps: int = 20, guidance: float = 7.0, negative: str | torch.Tensor | None = None,
                    eta: float = 0.0, batch_size: int | None = None) -> Iterator[DenoisingStep]:
    """The sampling loop, one `DenoisingStep` at a time; `sample` runs it to the end and decodes.

    Arguments as `sample`'s. A caller that needs only the first steps (a
    score read early in the trajectory, activations at the first step) stops
    iterating: nothing after that step is computed. Forward hooks attached
    around the iteration act on every step it runs.
    """
    seeds = [int(seed) for seed in seeds]
    if not seeds:
        raise ValueError("no seeds given")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    text = as_embeddings(handle, conditioning)
    n_items = text.shape[0]
    text = text.repeat_interleave(len(seeds), dim=0)  # item-major rows
    uncond = None
    if guidance != 1.0:
        uncond = as_embeddings(handle, negative if isinstance(negative, torch.Tensor) else [negative or ""])
        if uncond.shape[0] not in (1, n_items):
            raise ValueError(f"negative embeddings need 1 or {n_items} rows, got {uncond.shape[0]}")
        uncond = uncond.repeat_interleave(len(seeds), dim=0) if uncond.shape[0] > 1 else uncond

    scheduler = ddim_schedule(handle, steps)
    generators = noise_generators([seed for _ in range(n_items) for seed in seeds])
    latents = initial_noise(handle, generators) * scheduler.init_noise_sigma

    for index, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(latents, t)
        noise_text, noise_uncond = predict_noise(handle.unet, model_input, t, text, uncond, batch_size)
        noise_pred = guided_noise(noise_text, noise_uncond, guidance)
        # The per-image generators also draw DDIM's step noise when eta > 0, as in the pipeline.
        next_latents, predicted_original = scheduler.step(noise_pred, t, latents, eta=eta, generator=generators,
                                                          return_dict=False)
        # Steps report ε whatever the model predicts (a v-prediction model's v is converted), as analyses read it.
        yield DenoisingStep(index, steps, t, latents, as_epsilon(scheduler, noise_text, latents, t),
                            None if noise_uncond is None else as_epsilon(scheduler, noise_uncond, latents, t),
                            noise_pred, next_latents, predicted_original)
        latents = next_latents


def ddim_schedule(handle: ModelHandle, steps: int) -> DDIMScheduler:
    """A fresh DDIM scheduler from the handle's config with `steps` timesteps set.

    A scheduler of our own: `set_timesteps` mutates it, and calls may run concurrently.
    """
    scheduler = DDIMScheduler.from_config(handle.scheduler.config)
    trained = scheduler.config.num_train_timesteps
    if steps > trained:
        raise ValueError(f"{steps} denoising steps: this model's schedule has {trained} timesteps")
    scheduler.set_timesteps(steps, device=handle.device)
    # With "leading" spacing and SD's steps_offset=1, as many steps as timesteps reach past the last one.
    if scheduler.timesteps.max() >= trained:
        raise ValueError(f"{steps} denoising steps: this model's schedule ({trained} timesteps, steps_offset "
                         f"{scheduler.config.steps_offset}) takes at most {trained - 1}")
    return scheduler


@torch.no_grad()
def sample(handle: ModelHandle, conditioning: list[str] | torch.Tensor, seeds: Sequence[int], steps: int = 20,
           guidance: float = 7.0, negative: str | torch.Tensor | None = None,
           callback: Callable[[DenoisingStep], None] | None = None, eta: float = 0.0,
           batch_size: int | None = None) -> SampleResult:
    """Generate one image per (item, seed), item-major: item 0 with every seed, then item 1, ...

    `conditioning`: prompts or embeddings `[n, 77, d]`. `negative`: the
    unconditional branch of classifier-free guidance, a prompt or embeddings
    `[1 or n, 77, d]`; None means the empty prompt. The guided prediction is
    ε(x_t, y0) + guidance·(ε(x_t, y) − ε(x_t, y0)); with guidance == 1 only
    ε(x_t, y) is evaluated. `callback(step)` runs after every step (under
    `torch.no_grad`) and may raise `SamplingCancelled` to stop; it propagates
    to the caller. `batch_size` caps the images per UNet call (default: all at once).
    """
    seeds = [int(seed) for seed in seeds]
    wen_first_step = None
    for step in denoising_steps(handle, conditioning, seeds, steps, guidance, negative, eta, batch_size):
        if step.index == 0 and step.noise_uncond is not None:
            wen_first_step = noise_gap(step.noise_text, step.noise_uncond).cpu()
        if callback is not None:
            callback(step)
    latents = step.next_latents
    chunk = batch_size or latents.shape[0]
    images = torch.cat([handle.decode_latents(latents[start:start + chunk]).float().cpu()
                        for start in range(0, latents.shape[0], chunk)])
    return SampleResult(images=images, seeds=seeds, steps=steps, guidance=guidance, wen_first_step=wen_first_step)
