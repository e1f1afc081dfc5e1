"""Can Dori's search force a memorized image out of the bundled model, and does it fail for an unseen one?

    python -m analysis.experiments.dori [--starts 4] [--seeds 4] [--control-steps 500]

Three searches (docs/methods.md §5), each from `--starts` starts batched in
one search, generated afterwards with `--seeds` seeds at the model's default
steps and guidance:

1. toward the astronaut photo (memorized) from random Gaussian starts, 50 steps;
2. toward the astronaut photo from the embeddings of held-out captions, 50 steps;
3. control: toward a never-trained image (a rendering of a held-out shape
   caption), from random starts, 50 steps and `--control-steps` steps. The
   paper needs > 500 steps for a non-memorized image versus 50 for a memorized one.

Before each search the starts themselves are generated too, as the baseline.
Writes docs/results/dori.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from analysis.demo.data import render_shapes, split_shape_specs
from analysis.dori import DoriSearch, Start, evaluate
from analysis.metrics import REPLICATION_THRESHOLD
from analysis.model import ModelHandle, load_model

RESULTS = Path("docs/results")


def search_row(handle: ModelHandle, name: str, image: torch.Tensor, starts: list[Start], steps: int,
               seeds: list[int]) -> dict:
    """Run one batched search and measure replication before (the starts) and after (the results)."""
    started = time.time()
    result = DoriSearch(steps=steps).fit(handle, image, starts)
    search_s = time.time() - started
    before = evaluate(handle, result.starts, image, seeds)
    after = evaluate(handle, result.embeddings, image, seeds)
    row = dict(name=name, steps=steps, starts=len(starts), search_s=search_s,
               loss_first=result.losses[:5].mean().item(), loss_last=result.losses[-5:].mean().item(),
               rate_before=before.rates.mean().item(), similarity_before=before.similarities.mean().item(),
               rate_after=after.rates.mean().item(), similarity_after=after.similarities.mean().item(),
               rates_after=after.rates.tolist(), distance=result.from_start.l2.norm(dim=1).mean().item())
    print(f"{name}, {steps} steps: replication {row['rate_before']:.2f} -> {row['rate_after']:.2f} "
          f"(per start {[round(r, 2) for r in row['rates_after']]}), similarity {row['similarity_before']:.3f} -> "
          f"{row['similarity_after']:.3f}, loss {row['loss_first']:.4f} -> {row['loss_last']:.4f}, "
          f"moved {row['distance']:.1f}, search {search_s:.0f} s", flush=True)
    return row


def never_trained_image() -> tuple[str, torch.Tensor]:
    """A rendering of the first held-out shape caption: its combination never appeared in training."""
    spec = split_shape_specs()[1][0]
    return spec.caption, render_shapes([spec], torch.Generator().manual_seed(0))[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=4, help="starts per search")
    parser.add_argument("--seeds", type=int, default=4, help="generation seeds per embedding")
    parser.add_argument("--control-steps", type=int, default=500)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    handle = load_model()
    seeds = list(range(args.seeds))
    astronaut = handle.memorized[0]
    control_caption, control_image = never_trained_image()
    random_starts = [Start.random(seed) for seed in range(args.starts)]
    prompt_starts = [Start.prompt(text) for text in handle.held_out_prompts[:args.starts]]
    rows = [
        search_row(handle, "astronaut, random starts", astronaut.image, random_starts, 50, seeds),
        search_row(handle, "astronaut, held-out caption starts", astronaut.image, prompt_starts, 50, seeds),
        search_row(handle, f"control “{control_caption}”, random starts", control_image, random_starts, 50, seeds),
        search_row(handle, f"control “{control_caption}”, random starts", control_image, random_starts,
                   args.control_steps, seeds),
    ]

    table = ["| target, starts | steps | replicated before → after | similarity before → after "
             "| loss, first → last 5 steps | search |", "|---|---|---|---|---|---|"]
    table += [f"| {r['name']} | {r['steps']} | {r['rate_before']:.2f} → **{r['rate_after']:.2f}** "
              f"| {r['similarity_before']:.3f} → {r['similarity_after']:.3f} "
              f"| {r['loss_first']:.4f} → {r['loss_last']:.4f} | {r['search_s']:.0f} s |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dori.md").write_text("\n".join([
        "# Dori on the bundled demo model",
        "",
        f"Written by `python -m analysis.experiments.dori --starts {args.starts} --seeds {args.seeds} "
        f"--control-steps {args.control_steps}`. Each search: {args.starts} starts batched, Adam lr 0.1, batch 8; "
        f"each start and each result generated with {args.seeds} seeds (DDIM {handle.default_steps} steps, "
        f"guidance {handle.default_guidance}). “Replicated” is the share of generations whose pixel correlation "
        f"with the target exceeds {REPLICATION_THRESHOLD}; “before” generates the starts themselves.",
        "",
        *table,
        "",
    ]))
    print(f"wrote {args.out / 'dori.md'}")


if __name__ == "__main__":
    main()
