"""Integrated Gradients (captum) of the memorization score over the prompt's token embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from captum.attr import LayerIntegratedGradients

from analysis.attribution.common import (OBJECTIVE_SEEDS, TokenAttribution, memorization_objective, prompt_tokens,
                                         to_words)
from analysis.model import ModelHandle


class IntegratedGradients:
    """Path integral of ∂m/∂e from the empty prompt's token embeddings to the prompt's, summed over features per token.

    `e` is the text encoder's input: the token-embedding lookup, before the
    position embeddings and the (causal) transformer. Attributing there rather
    than at the encoder's output y credits a word with everything it changes,
    also through the later positions that attend to it, as removing the word
    (occlusion) does. Baseline: the empty prompt's tokens (BOS, EOS, padding).
    Where padding is EOS, as in SD v1.x and the bundled model, it differs from
    the prompt only at the word positions. m(empty prompt) = 0 by definition,
    so the attributions over all positions add up to m(y) (completeness);
    `convergence_delta` reports how far the Gauss-Legendre sum with `n_steps`
    is from that. Scores are signed: a negative token lowers m.
    """

    def __init__(self, seeds: Sequence[int] = OBJECTIVE_SEEDS, n_steps: int = 32, internal_batch_size: int = 8):
        self.seeds = list(seeds)
        self.n_steps = n_steps
        self.internal_batch_size = internal_batch_size

    def attribute(self, handle: ModelHandle, prompt: str) -> TokenAttribution:
        pieces, words, word_of_piece = prompt_tokens(handle, prompt)
        objective = memorization_objective(handle, self.seeds)

        def score_of_ids(ids: torch.Tensor) -> torch.Tensor:
            return objective(handle.text_encoder(ids).last_hidden_state.to(handle.dtype))

        ids, empty = handle.tokenizer([prompt, ""], padding="max_length", max_length=handle.tokenizer.model_max_length,
                                      truncation=True, return_tensors="pt").input_ids.to(handle.device)
        ig = LayerIntegratedGradients(score_of_ids, handle.text_encoder.get_input_embeddings())
        attributions, delta = ig.attribute(ids[None], baselines=empty[None], n_steps=self.n_steps,
                                           method="gausslegendre", internal_batch_size=self.internal_batch_size,
                                           return_convergence_delta=True)
        per_position = attributions[0].float().sum(dim=-1).detach().cpu()
        token_scores = per_position[1:len(pieces) + 1]  # skip BOS, EOS, padding
        with torch.no_grad():
            score = score_of_ids(ids[None])[0].item()
        return TokenAttribution("integrated gradients", prompt, pieces, token_scores, words,
                                to_words(token_scores, word_of_piece, len(words)), score,
                                convergence_delta=delta.abs().item())
