"""What the attribution methods share: the objective they explain and the token-to-word mapping."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from analysis.wen_score import wen_magnitude
from analysis.model import ModelHandle
from analysis.sampling import encode_prompts, initial_noise, noise_generators

OBJECTIVE_SEEDS = (0, 1, 2, 3)  # every method's default seeds for m(y)
WORD_END = "</w>"  # CLIP's BPE marks the last piece of every word


@dataclass
class TokenAttribution:
    """Scores of a prompt's tokens (BOS, EOS and padding excluded) and of its words."""

    method: str
    prompt: str
    tokens: list[str]  # BPE pieces, positions 1..n of the tokenized prompt
    token_scores: torch.Tensor  # [n]
    words: list[str]
    word_scores: list[float]  # gradient methods: sum of the scores of each word's pieces; occlusion: the word's drop
    score: float  # the memorization score m(y) that is explained
    convergence_delta: float | None = None  # IG only: sum of attributions − (m(y) − m(baseline))

    def ranked_words(self) -> list[tuple[str, float]]:
        return sorted(zip(self.words, self.word_scores), key=lambda pair: -pair[1])


def prompt_tokens(handle: ModelHandle, prompt: str) -> tuple[list[str], list[str], list[int]]:
    """BPE pieces of the prompt (without BOS/EOS), its words, and the word index of each piece.

    ValueError when the prompt has no tokens: there is nothing to attribute.
    """
    ids = handle.tokenizer(prompt, truncation=True, max_length=handle.tokenizer.model_max_length).input_ids[1:-1]
    if not ids:
        raise ValueError("the prompt has no tokens to attribute")
    pieces = handle.tokenizer.convert_ids_to_tokens(ids)
    words, word_of_piece, current = [], [], ""
    for piece in pieces:
        word_of_piece.append(len(words))
        current += piece.removesuffix(WORD_END)
        if piece.endswith(WORD_END):
            words.append(current)
            current = ""
    if current:  # a prompt cut off by truncation in the middle of a word
        words.append(current)
    # Pieces spell bytes as printable characters ("ü" is "Ã¼"): decode, so words read and retokenize as typed.
    words = [handle.tokenizer.convert_tokens_to_string([word]) for word in words]
    return pieces, words, word_of_piece


def memorization_objective(handle: ModelHandle, seeds: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """m(y): Wen et al.'s first-step magnitude, mean over `seeds`, for embeddings `[b, 77, d]` -> `[b]`.

    The same x_T and first timestep as `sample` with the model's default
    steps, so the score matches `wen_score.wen_score`. Differentiable in y.
    """
    scheduler = DDIMScheduler.from_config(handle.scheduler.config)
    scheduler.set_timesteps(handle.default_steps)
    t = scheduler.timesteps[0]
    x_t = scheduler.scale_model_input(initial_noise(handle, noise_generators(seeds)) * scheduler.init_noise_sigma, t)
    y0 = encode_prompts(handle, [""])

    def objective(y: torch.Tensor) -> torch.Tensor:
        rows = y.repeat_interleave(len(seeds), dim=0)
        x = x_t.repeat(y.shape[0], 1, 1, 1)
        return wen_magnitude(handle, x, t, rows, y0).view(y.shape[0], len(seeds)).mean(dim=1)

    return objective


def to_words(scores: torch.Tensor, word_of_piece: list[int], n_words: int) -> list[float]:
    word_scores = [0.0] * n_words
    for score, word in zip(scores.tolist(), word_of_piece):
        word_scores[word] += score
    return word_scores
