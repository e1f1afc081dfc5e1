"""Wen et al.'s token attribution: the gradient norm of the memorization score per token."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from analysis.attribution.common import (OBJECTIVE_SEEDS, TokenAttribution, memorization_objective, prompt_tokens,
                                         to_words)
from analysis.model import ModelHandle
from analysis.sampling import encode_prompts


class GradientNorm:
    """Score of token i: ‖∂m/∂y_i‖₂ over the feature dimension, m averaged over `seeds`.

    docs/methods.md §3.
    """

    def __init__(self, seeds: Sequence[int] = OBJECTIVE_SEEDS):
        self.seeds = list(seeds)

    def attribute(self, handle: ModelHandle, prompt: str) -> TokenAttribution:
        pieces, words, word_of_piece = prompt_tokens(handle, prompt)
        y = encode_prompts(handle, [prompt]).detach().requires_grad_(True)
        score = memorization_objective(handle, self.seeds)(y)[0]
        (gradient,) = torch.autograd.grad(score, y)
        token_scores = gradient[0, 1:len(pieces) + 1].float().norm(dim=-1).cpu()  # skip BOS, EOS, padding
        return TokenAttribution("gradient norm", prompt, pieces, token_scores, words,
                                to_words(token_scores, word_of_piece, len(words)), score.item())
