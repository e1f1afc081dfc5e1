"""The fine-tuning's loss and which UNet parameters it trains."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from analysis.model import ModelHandle
from analysis.sampling import predict_noise, training_target

TRAINABLE_PRESETS = {"attn2": (".attn2.",), "attn": (".attn1.", ".attn2."), "all": ("",)}


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
