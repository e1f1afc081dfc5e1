"""What fine-tuning achieved: replication under the caption and a fresh Dori attack, and its side effects."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from analysis.dori import DoriSearch, DoriStep, Start, evaluate
from analysis.masks import generate
from analysis.memorized import MemorizedImage
from analysis.metrics import paired_similarity
from analysis.model import ModelHandle
from analysis.sampling import DenoisingStep, encode_prompts

# Seeds of the evaluation's attacks and generations start here, far from any seed used in training.
EVALUATION_SEED_OFFSET = 1_000_000
SIDE_EFFECT_PROMPTS = 4  # held-out prompts whose generations `side_effects` compares


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
        held_out.append(dict(prompt=prompt, similarity=paired_similarity(before, after), before=before, after=after))
    return dict(others=others, held_out=held_out)


def json_ready(row: dict) -> dict:
    """`row` without its tensors."""
    return {key: value for key, value in row.items() if not isinstance(value, torch.Tensor)}
