"""Integrated Gradients (captum) of the memorization score over the prompt's token embeddings."""

from __future__ import annotations

from collections.abc import Sequence

from captum.attr import IntegratedGradients as CaptumIntegratedGradients

from analysis.attribution.common import TokenAttribution, memorization_objective, prompt_tokens, to_words
from analysis.model import ModelHandle
from analysis.sampling import encode_prompts


class IntegratedGradients:
    """Path integral of ∂m/∂y from the empty prompt's embedding y0 to y, summed over features per token.

    Baseline: y0, where m(y0) = 0 by definition, so the token scores add up to
    m(y) (completeness); `convergence_delta` reports how far the Riemann sum
    with `n_steps` is from that. Scores are signed: a negative token lowers m.
    """

    def __init__(self, seeds: Sequence[int] = (0, 1, 2, 3), n_steps: int = 32, internal_batch_size: int = 8):
        self.seeds = list(seeds)
        self.n_steps = n_steps
        self.internal_batch_size = internal_batch_size

    def attribute(self, handle: ModelHandle, prompt: str) -> TokenAttribution:
        pieces, words, word_of_piece = prompt_tokens(handle, prompt)
        objective = memorization_objective(handle, self.seeds)
        y = encode_prompts(handle, [prompt])
        y0 = encode_prompts(handle, [""])
        ig = CaptumIntegratedGradients(objective)
        attributions, delta = ig.attribute(y, baselines=y0, n_steps=self.n_steps, method="gausslegendre",
                                           internal_batch_size=self.internal_batch_size,
                                           return_convergence_delta=True)
        per_position = attributions[0].float().sum(dim=-1).cpu()
        token_scores = per_position[1:len(pieces) + 1]  # skip BOS, EOS, padding
        return TokenAttribution("integrated gradients", prompt, pieces, token_scores, words,
                                to_words(token_scores, word_of_piece, len(words)),
                                objective(y)[0].item(), convergence_delta=delta.abs().item())
