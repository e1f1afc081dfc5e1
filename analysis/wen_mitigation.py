"""Wen et al.'s inference-time mitigation (ICLR 2024; docs/methods.md §3).

Memorized prompts pull the text-conditional noise prediction far from the
unconditional one at the first denoising step. The mitigation optimises the
prompt's embedding y to shrink that gap, m(y) = ‖ε(x_T, y) − ε(x_T, y0)‖₂ (mean
over the generation seeds, at the first timestep of the model's default
schedule), with AdamW (lr 0.05, at most 10 iterations), stopping once m ≤ a
target; the BOS token stays fixed. The image is then sampled from the
optimised embedding with the same seeds by the project's one sampling loop.

    result = WenMitigation().fit(handle, caption, seeds=range(4))
    images = sample(handle, result.embedding[None], range(4), ...).images

Default target: the mean m of the model's held-out prompts for the same seeds,
i.e. "as far from the unconditional prediction as a normal prompt".

Against Dori: the mitigation rewrites the input embedding and leaves the
weights alone. An attacker who feeds a Dori trigger directly as the embedding
(the model accepts embeddings) skips it entirely: Dori on the plain model is
Dori against Wen. A deployment that also runs the mitigation on embeddings it
is given is modelled by `fit` on the trigger itself (an embedding
`[77, d]` instead of a prompt); docs/results/robust_mitigation.md measures both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from analysis.attribution.common import memorization_objective
from analysis.model import ModelHandle
from analysis.sampling import encode_prompts

HELD_OUT_PROMPTS_FOR_TARGET = 10


@dataclass
class WenMitigationResult:
    embedding: torch.Tensor  # [77, d] float32 CPU, the mitigated embedding to sample from
    start: torch.Tensor  # [77, d] the prompt's (or given) embedding
    trace: list[float]  # m(y) before each update and after the last one
    target: float
    reached: bool  # m ≤ target at the end


@dataclass
class WenMitigation:
    """Minimise Wen's first-step magnitude over the embedding. Hyperparameters here, the work in `fit`.

    `target`: stop once m ≤ target; None: the mean m of up to 10 of the
    model's held-out prompts for the same seeds.
    """

    lr: float = 0.05
    max_iterations: int = 10
    target: float | None = None

    def fit(self, handle: ModelHandle, conditioning: str | torch.Tensor, seeds: Sequence[int]) -> WenMitigationResult:
        """Mitigate a prompt or an embedding `[77, d]` for generation with `seeds`."""
        seeds = [int(seed) for seed in seeds]
        if not seeds:
            raise ValueError("no seeds given")
        if self.max_iterations < 0:
            raise ValueError(f"max_iterations must be >= 0, got {self.max_iterations}")
        if isinstance(conditioning, str):
            start = encode_prompts(handle, [conditioning])[0]
        elif conditioning.ndim == 2:
            start = conditioning.to(handle.device, handle.dtype)
        else:
            raise ValueError(f"an embedding to mitigate has shape [tokens, d], got {tuple(conditioning.shape)}")
        objective = memorization_objective(handle, seeds)
        target = self.target if self.target is not None else self.held_out_target(handle, objective)

        # Only tokens 1.. are parameters: BOS gets no gradient and no weight decay.
        bos, rest = start[:1].float(), start[1:].float().clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([rest], lr=self.lr)
        trace = []
        with torch.enable_grad():  # callers such as a UI may run under no_grad
            for iteration in range(self.max_iterations + 1):
                magnitude = objective(torch.cat([bos, rest])[None].to(handle.dtype))[0]
                trace.append(magnitude.item())
                if trace[-1] <= target or iteration == self.max_iterations:
                    break
                optimizer.zero_grad(set_to_none=True)
                magnitude.backward()
                optimizer.step()
        embedding = torch.cat([bos, rest.detach()]).cpu()
        return WenMitigationResult(embedding=embedding, start=start.float().cpu(), trace=trace, target=target,
                                   reached=trace[-1] <= target)

    @staticmethod
    def held_out_target(handle: ModelHandle, objective) -> float:
        prompts = handle.held_out_prompts[:HELD_OUT_PROMPTS_FOR_TARGET]
        if not prompts:
            raise ValueError("target=None needs the model's held-out prompts, and this model has none: pass a target")
        with torch.no_grad():
            return objective(encode_prompts(handle, prompts)).mean().item()
