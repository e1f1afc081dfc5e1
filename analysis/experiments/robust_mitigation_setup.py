"""What the robust-mitigation experiment measures every method on, and how: the selected images and their attack,
held-out and non-selected captions, the held-out test loss and caption fidelity, and the fine-tuning variants'
settings."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from analysis.demo.data import read_colors, render_shapes, split_shape_specs
from analysis.dori import DoriSearch, Start
from analysis.finetune import attack, denoising_loss
from analysis.masks import Mask, generate
from analysis.metrics import paired_similarity, replication
from analysis.model import ModelHandle
from analysis.sampling import encode_prompts
from analysis.wen_mitigation import WenMitigation

# Attack starts, search noise and generation seeds from here on are used by no other step.
ATTACK_SEED = 2_000_000
HELD_OUT_LOSS_SEED = 4_000_000  # renderings, noise and steps of the held-out denoising loss, the same for every method
HELD_OUT_RENDERINGS = 8  # per held-out caption in the held-out denoising loss
FIDELITY_SEEDS = (0, 1, 2, 3)  # generations per held-out caption in the caption fidelity
EMA_DECAY = 0.99  # of the variants that ship a moving average of the fine-tuned weights
WIDE_NORMAL_ROWS = 3  # the distilled_wide variant's normal rows a step, times the default's


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)

def union(masks: list[Mask], method: str) -> Mask:
    """One mask removing every unit any of `masks` removes."""
    removed: dict[str, torch.Tensor] = {}
    for mask in masks:
        for name, units in mask.removed.items():
            removed[name] = units | removed[name] if name in removed else units.clone()
    return Mask(removed, method, prompt="; ".join(m.prompt for m in masks), model=masks[0].model)


class Conditions:
    """What every method is measured on: the selected images, the attack, the held-out and the other captions."""

    def __init__(self, handle: ModelHandle, targets: list[int], args):
        self.handle = handle
        self.targets = targets
        self.seeds = list(range(ATTACK_SEED, ATTACK_SEED + args.seeds))
        self.other_seeds = list(range(ATTACK_SEED, ATTACK_SEED + args.other_seeds))
        self.dori = DoriSearch(steps=args.dori_steps)
        self.held_out = handle.held_out_prompts[:args.held_out]
        self.others = [i for i in range(len(handle.memorized)) if i not in targets]

    def starts(self, j: int) -> tuple[DoriSearch, list[Start]]:
        seed = ATTACK_SEED + 1000 * j
        caption = self.handle.memorized[self.targets[j]].caption
        return dataclasses.replace(self.dori, seed=seed), [Start.prompt(caption), Start.random(seed)]


def held_out_loss(handle: ModelHandle, batch_size: int = 40) -> float:
    """The model's test loss: mean L_DM over fixed renderings of every held-out caption, with fixed noise and steps.

    Unlike the held-out similarity (the same image at the same seed) it asks whether the model still denoises
    captions it never trained on as well as before, which is what utility means for a generative model.
    """
    specs = [spec for spec in split_shape_specs()[1] for _ in range(HELD_OUT_RENDERINGS)]
    generator = torch.Generator().manual_seed(HELD_OUT_LOSS_SEED)
    images = render_shapes(specs, generator)
    losses = []
    with torch.no_grad():
        for start in range(0, len(specs), batch_size):
            chunk = specs[start:start + batch_size]
            text = encode_prompts(handle, [spec.caption for spec in chunk])
            losses.append(denoising_loss(handle, handle.unet, images[start:start + batch_size], text, generator)
                          * len(chunk))
    return (sum(losses) / len(specs)).item()


def held_out_fidelity(draw: Callable[[list[str], list[int]], torch.Tensor]) -> float:
    """Share of generations of every held-out caption whose background and shape colour read as the caption's.

    Like the CLIP score the paper's utility check rests on, it asks whether the model still draws what a caption
    says, not the same picture: `draw(captions, seeds)` returns images `[captions * seeds, 3, H, W]`.
    """
    specs = split_shape_specs()[1]
    read = read_colors(draw([spec.caption for spec in specs], list(FIDELITY_SEEDS)))
    expected = [(spec.background, spec.color) for spec in specs for _ in FIDELITY_SEEDS]
    return mean(got == want for got, want in zip(read, expected))


def measure(handle: ModelHandle, conditions: Conditions, held_out_before: torch.Tensor, mask: Mask | None = None) -> dict:
    """Attack every selected image, and measure held-out and non-selected captions, on `handle` under `mask`."""
    def run() -> dict:
        rows, started = [], time.time()
        for j, index in enumerate(conditions.targets):
            dori, starts = conditions.starts(j)
            rows.append(attack(handle, handle.memorized[index], dori, starts, conditions.seeds))
            print(f"  {rows[-1]['caption'][:40]}: prompt {rows[-1]['prompt_replication']:.2f}, "
                  f"Dori {rows[-1]['dori_replication']:.2f}", flush=True)
        attack_s = time.time() - started
        held_out = generate(handle, conditions.held_out, [0])
        others = [replication(generate(handle, [handle.memorized[i].caption], conditions.other_seeds),
                              handle.memorized[i].image).rate for i in conditions.others]
        return dict(targets=rows, attack_seconds=round(attack_s, 1), held_out_images=held_out,
                    held_out_similarity=paired_similarity(held_out_before, held_out),
                    held_out_loss=held_out_loss(handle),
                    held_out_fidelity=held_out_fidelity(lambda prompts, seeds: generate(handle, prompts, seeds)),
                    others_replication=others)
    if mask is None:
        return run()
    with mask.applied(handle):
        return run()


def measure_wen(handle: ModelHandle, conditions: Conditions, held_out_before: torch.Tensor, plain: dict,
                wen: WenMitigation) -> dict:
    """Wen's mitigation on every prompt; the plain model's Dori triggers as given and passed through Wen."""
    def mitigated(conditioning, seeds) -> torch.Tensor:
        return generate(handle, wen.fit(handle, conditioning, seeds).embedding[None], seeds)

    rows, started = [], time.time()
    for j, index in enumerate(conditions.targets):
        item = handle.memorized[index]
        prompt = mitigated(item.caption, conditions.seeds)
        through_wen = torch.stack([mitigated(trigger, conditions.seeds) for trigger in plain["targets"][j]["triggers"]])
        rows.append(dict(caption=item.caption,
                         prompt_replication=replication(prompt, item.image).rate,
                         prompt_similarity=replication(prompt, item.image).similarities.mean().item(),
                         prompt_images=prompt,
                         # Given as embeddings, the triggers skip the mitigation: the plain model's attack.
                         dori_replication=plain["targets"][j]["dori_replication"],
                         dori_similarity=plain["targets"][j]["dori_similarity"],
                         dori_images=plain["targets"][j]["dori_images"],
                         dori_through_wen_replication=replication(through_wen.flatten(0, 1), item.image).rate,
                         dori_through_wen_images=through_wen))
        print(f"  {item.caption[:40]}: prompt {rows[-1]['prompt_replication']:.2f}, Dori through Wen "
              f"{rows[-1]['dori_through_wen_replication']:.2f}", flush=True)
    attack_s = time.time() - started
    def draw(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return torch.cat([mitigated(prompt, seeds) for prompt in prompts])

    held_out = draw(conditions.held_out, [0])
    others = [replication(mitigated(handle.memorized[i].caption, conditions.other_seeds), handle.memorized[i].image).rate
              for i in conditions.others]
    return dict(targets=rows, attack_seconds=round(attack_s, 1), held_out_images=held_out,
                held_out_similarity=paired_similarity(held_out_before, held_out),
                held_out_fidelity=held_out_fidelity(draw), others_replication=others)
