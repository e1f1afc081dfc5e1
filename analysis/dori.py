"""Dori: search a text embedding that makes the UNet reproduce a training image (Kowalczuk et al. 2025).

docs/methods.md §6. The search optimises `y_adv`, the text encoder's output
`[77, d]`, to minimise the denoising loss toward the image,

    ‖ε − unet(√ᾱ_t z0 + √(1−ᾱ_t) ε, t, y_adv)‖²   (mean over entries and the batch)

(the target is v instead of ε for a v-prediction model: `analysis.sampling.training_target`)

with a fresh batch of (ε, t) at every step, t uniform over the scheduler's
training timesteps (0..T−1 in diffusers' numbering, the paper's 1..T), Adam,
with `DoriSearch`'s learning rate, steps and batch. Several starts are optimised together in one UNet
call (starts × batch rows); the loss is the sum of each start's own mean, so
each start's gradient, and with Adam its whole trajectory, is independent of
the others. Start i draws its (ε, t) from a generator seeded `seed + i`, so a
batched search equals separate searches up to float rounding.

    result = DoriSearch().fit(handle, image, [Start.random(0), Start.prompt(caption)], prompt=caption)
    generations = evaluate(handle, result.embeddings, image, seeds=range(4))

To search against a mitigated model, run both calls inside `with mask.applied(handle):`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from analysis.limits import MAX_SEARCH_BATCH, MAX_SEARCH_STEPS, MAX_SEED
from analysis.metrics import ReplicationResult
from analysis.model import ModelHandle
from analysis.sampling import (DenoisingStep, encode_prompts, noise_generators, predict_noise, sample,
                               training_target)
from analysis.settings import real, setting, whole


@dataclass(eq=False)
class Start:
    """Where a search starts. Make one with `Start.prompt`, `Start.random` or `Start.embedding`."""

    kind: str  # "prompt", "random" or "embedding"
    text: str | None = None  # kind "prompt"
    seed: int | None = None  # kind "random"
    scale: float | None = None  # kind "random"; None: the std of the empty prompt's embedding
    tensor: torch.Tensor | None = None  # kind "embedding", [77, d]

    @classmethod
    def prompt(cls, text: str) -> Start:
        """The prompt's own embedding (the paper's "small perturbation" of a mitigated prompt, or another prompt)."""
        return cls("prompt", text=text)

    @classmethod
    def random(cls, seed: int, scale: float | None = None) -> Start:
        """Gaussian noise N(0, scale²) in every entry (fully random triggers).

        The default scale is the std of all entries of the empty prompt's
        embedding, so the start has the size of a real embedding (SD's text
        encoder ends in a layer norm: every token has about mean 0 and the same
        spread; on the demo model the std is 1.0).
        """
        return cls("random", seed=int(seed), scale=scale)

    @classmethod
    def embedding(cls, tensor: torch.Tensor) -> Start:
        """A given embedding `[77, d]`, e.g. a trigger found earlier."""
        if tensor.ndim != 2:
            raise ValueError(f"a start embedding has shape [tokens, d], got {tuple(tensor.shape)}")
        return cls("embedding", tensor=tensor)

    def resolve(self, handle: ModelHandle) -> torch.Tensor:
        """The start embedding `[77, d]`, float32 on the handle's device."""
        if self.kind == "prompt":
            return encode_prompts(handle, [self.text])[0].float()
        if self.kind == "random":
            empty = encode_prompts(handle, [""])[0].float()
            scale = empty.std().item() if self.scale is None else self.scale
            noise = torch.randn(empty.shape, generator=torch.Generator().manual_seed(self.seed))
            return (noise * scale).to(handle.device)
        if self.kind == "embedding":
            return self.tensor.to(handle.device, torch.float32)
        raise ValueError(f"unknown start kind {self.kind!r}")

    def describe(self) -> dict:
        """JSON-ready description (the tensor of an "embedding" start is left out)."""
        fields = dict(prompt=dict(text=self.text), random=dict(seed=self.seed, scale=self.scale), embedding={})
        return dict(kind=self.kind, **fields[self.kind])


@dataclass
class DoriStep:
    """What a `fit` callback receives after each optimisation step. One entry per start."""

    index: int  # 0-based step number
    total: int  # number of steps of the search
    loss: torch.Tensor  # [S] this step's denoising loss, before the update
    distance: torch.Tensor  # [S] ‖y_adv − y_start‖₂ over the whole embedding, after the update
    embeddings: torch.Tensor  # [S, 77, d] y_adv after the update, float32 CPU (for previews of a running search)


@dataclass
class DoriPreview:
    """Generations of a running search's current embedding (the first start's), at step `step` (1-based)."""

    step: int
    images: torch.Tensor  # [seeds, 3, H, W]
    similarities: list[float]


@dataclass
class TokenDistances:
    """Per-token comparison of embeddings with a reference, each `[S, 77]`."""

    l2: torch.Tensor  # ‖y_i − r_i‖₂ over the feature dimension
    linf: torch.Tensor  # max_j |y_ij − r_ij|
    cosine: torch.Tensor  # cos(y_i, r_i)


def token_distances(embeddings: torch.Tensor, reference: torch.Tensor) -> TokenDistances:
    """Compare embeddings `[S, 77, d]` token by token with `reference` (`[77, d]` or `[S, 77, d]`)."""
    embeddings, reference = torch.broadcast_tensors(embeddings.float(), reference.float())
    difference = embeddings - reference
    return TokenDistances(l2=difference.norm(dim=-1), linf=difference.abs().amax(dim=-1),
                          cosine=F.cosine_similarity(embeddings, reference, dim=-1))


@dataclass
class DoriResult:
    """A search's outcome. Row s of every tensor belongs to start s. Tensors are float32 on the CPU."""

    embeddings: torch.Tensor  # [S, 77, d] the optimised y_adv
    starts: torch.Tensor  # [S, 77, d] where each search began
    losses: torch.Tensor  # [steps, S] the loss at every step (before that step's update)
    from_start: TokenDistances
    prompt: str | None  # the prompt the distances below refer to (the mitigated prompt)
    from_prompt: TokenDistances | None


@dataclass
class DoriSearch:
    """Adversarial embedding search toward one image. Hyperparameters here, the work in `fit`.

    `tokens`: "all" or the token positions (0..76) that move; the others stay
    exactly at the start. `batch_size`: (ε, t) pairs per start and step.
    `seed`: start i draws its (ε, t) from a generator seeded `seed + i`.
    `gradient_checkpointing`: recompute the UNet's activations in the
    backward pass instead of keeping them (less memory at SD size, slower);
    the result is the same.

    The optimised embedding and Adam's state are float32 whatever the model's
    dtype; only the UNet's inputs are cast to it (fp16/bf16 on a GPU).
    """

    lr: float = real(0.1, "Adam's learning rate", 0)
    steps: int = whole(50, "search steps", 1, MAX_SEARCH_STEPS)
    batch_size: int = whole(8, "(noise, timestep) pairs per start and step", 1, MAX_SEARCH_BATCH)
    tokens: str | list[int] = setting("all", '"all" or the token positions (0..76) that move')
    seed: int = whole(0, "start i draws its (noise, timestep) pairs from seed + i", 0, MAX_SEED)
    gradient_checkpointing: bool = setting(False, "recompute the UNet's activations in the backward pass: "
                                                  "less memory, slower")

    def fit(self, handle: ModelHandle, target_image: torch.Tensor, starts: Sequence[Start], prompt: str | None = None,
            callback: Callable[[DoriStep], None] | None = None) -> DoriResult:
        """Optimise one embedding per start toward `target_image` (`[3, H, W]` in [-1, 1]).

        `prompt`: also report distances to this prompt's embedding.
        `callback(step)` runs after every step and may raise
        `analysis.sampling.SamplingCancelled` to stop; it propagates to the caller.
        """
        if not starts:
            raise ValueError("no starts given")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        start = torch.stack([s.resolve(handle) for s in starts])  # [S, 77, d]
        n_starts = start.shape[0]
        positions = torch.tensor(self._token_positions(start.shape[1]), device=handle.device)
        # Only the chosen positions are parameters; float32 whatever the model's dtype,
        # so that Adam's small updates are not rounded away.
        moving = start[:, positions].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([moving], lr=self.lr)

        z0 = handle.encode_images(target_image[None]).expand(n_starts * self.batch_size, -1, -1, -1)
        scheduler = handle.scheduler
        generators = noise_generators([self.seed + i for i in range(n_starts)])
        losses = []
        # enable_grad: callers such as a UI may run under no_grad.
        with torch.enable_grad(), _gradient_checkpointing(handle.unet, self.gradient_checkpointing):
            for index in range(self.steps):
                timesteps, noise = self._draw(handle, generators)
                x_t = scheduler.add_noise(z0, noise, timesteps)
                # ε, or v for v-prediction models (SD 2.x at 768 px).
                target = training_target(scheduler, z0, noise, timesteps)
                y_adv = start.index_copy(1, positions, moving)
                text = y_adv.to(handle.dtype).repeat_interleave(self.batch_size, dim=0)  # start-major rows
                prediction, _ = predict_noise(handle.unet, x_t, timesteps, text)
                squared_error = (prediction.float() - target.float()).square().flatten(1).mean(dim=1)
                loss = squared_error.view(n_starts, self.batch_size).mean(dim=1)  # [S]
                optimizer.zero_grad(set_to_none=True)
                loss.sum().backward()
                optimizer.step()
                losses.append(loss.detach().cpu())
                if callback is not None:
                    distance = (moving.detach() - start[:, positions]).flatten(1).norm(dim=1).cpu()
                    current = start.index_copy(1, positions, moving.detach()).cpu()
                    callback(DoriStep(index, self.steps, losses[-1], distance, current))

        embeddings = start.index_copy(1, positions, moving.detach()).cpu()
        start = start.cpu()
        prompt_embedding = encode_prompts(handle, [prompt])[0].float().cpu() if prompt is not None else None
        return DoriResult(
            embeddings=embeddings, starts=start, losses=torch.stack(losses),
            from_start=token_distances(embeddings, start), prompt=prompt,
            from_prompt=token_distances(embeddings, prompt_embedding) if prompt_embedding is not None else None)

    def _token_positions(self, n_tokens: int) -> list[int]:
        if self.tokens == "all":
            return list(range(n_tokens))
        positions = [int(p) for p in self.tokens]
        if not positions or len(set(positions)) != len(positions) or not all(0 <= p < n_tokens for p in positions):
            raise ValueError(f"tokens must be 'all' or distinct positions in [0, {n_tokens}), got {self.tokens!r}")
        return positions

    def _draw(self, handle: ModelHandle, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's timesteps `[S * batch]` and noise `[S * batch, C, h, w]`, each start from its own generator."""
        timesteps, noise = [], []
        for generator in generators:
            timesteps.append(torch.randint(0, handle.scheduler.config.num_train_timesteps, (self.batch_size,),
                                           generator=generator))
            noise.append(torch.randn((self.batch_size, *handle.latent_shape), generator=generator))
        return torch.cat(timesteps).to(handle.device), torch.cat(noise).to(handle.device, handle.dtype)


@contextmanager
def _gradient_checkpointing(unet, enabled: bool) -> Iterator[None]:
    """The block with the UNet's gradient checkpointing on if `enabled`, then as it was."""
    before = unet.is_gradient_checkpointing
    if enabled and not before:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if enabled and not before:
            unet.disable_gradient_checkpointing()


@dataclass
class Evaluation:
    """Generations of several embeddings and their replication of one image."""

    images: torch.Tensor  # [n, seeds, 3, H, W] in [-1, 1]
    replication: list[ReplicationResult]  # one per embedding, over its seeds

    @property
    def rates(self) -> torch.Tensor:
        """Share of replicating seeds per embedding, `[n]`."""
        return torch.tensor([result.rate for result in self.replication])

    @property
    def similarities(self) -> torch.Tensor:
        """Similarity of every generation to the image, `[n, seeds]`."""
        return torch.stack([result.similarities for result in self.replication])

    @property
    def replicated(self) -> torch.Tensor:
        """Whether each generation replicates the image, `[n, seeds]` bool."""
        return torch.stack([result.replicated for result in self.replication])


def evaluate(handle: ModelHandle, embeddings: torch.Tensor, target_image: torch.Tensor, seeds: Sequence[int],
             steps: int | None = None, guidance: float | None = None, batch_size: int | None = None,
             callback: Callable[[DenoisingStep], None] | None = None) -> Evaluation:
    """Generate every embedding `[n, 77, d]` with every seed and check each image against `target_image`
    (with the handle's replication metric).

    `steps` and `guidance` default to the handle's; `batch_size` and `callback` go to `sample`.
    """
    steps = handle.default_steps if steps is None else steps
    guidance = handle.default_guidance if guidance is None else guidance
    images = sample(handle, embeddings, seeds, steps=steps, guidance=guidance, batch_size=batch_size,
                    callback=callback).images
    images = images.view(embeddings.shape[0], -1, *images.shape[1:])  # sample's rows are item-major
    return Evaluation(images, [handle.replication_metric(generated, target_image) for generated in images])
