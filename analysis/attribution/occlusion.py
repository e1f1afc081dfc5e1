"""Word occlusion: how much the memorization score drops when one word is taken out of the prompt."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from analysis.attribution.common import OBJECTIVE_SEEDS, TokenAttribution, memorization_objective, prompt_tokens
from analysis.model import ModelHandle
from analysis.sampling import encode_prompts


class Occlusion:
    """Score of word w: m(prompt) − m(prompt without w), m averaged over `seeds`.

    No gradient and no assumption about the model: it measures directly how much
    the score depends on each word, so it is the ground truth the gradient
    methods approximate. The prompt without w is the other words of
    `prompt_tokens` joined by single spaces; CLIP's tokenizer lowercases and
    splits punctuation into words of its own anyway, so this prompt encodes to
    the same pieces minus w's. Each piece of a word gets the word's score:
    removing the word removes all of its pieces at once, so the pieces share
    one measurement rather than splitting it.
    """

    def __init__(self, seeds: Sequence[int] = OBJECTIVE_SEEDS):
        self.seeds = list(seeds)

    def attribute(self, handle: ModelHandle, prompt: str) -> TokenAttribution:
        pieces, words, word_of_piece = prompt_tokens(handle, prompt)
        occluded = [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]
        with torch.no_grad():  # one batch: the prompt, then each occluded prompt
            scores = memorization_objective(handle, self.seeds)(encode_prompts(handle, [prompt, *occluded]))
        drops = (scores[0] - scores[1:]).float().cpu()
        return TokenAttribution("occlusion", prompt, pieces, drops[word_of_piece], words, drops.tolist(),
                                scores[0].item())
