"""Does the bundled model memorize, and does the replication threshold mean what it says?

    python -m analysis.experiments.memorization [--seeds 10] [--held-out 15] [--model FOLDER]

For every memorized caption: the share of seeds whose generation exceeds the
replication threshold against its training image. For held-out captions
(never trained) and the empty prompt: the same against the nearest memorized
photo, and, for reference, against the nearest image of a fixed bank of
procedural training renderings. Wen et al.'s score (4 seeds) separating
memorized from held-out prompts, as an AUC, with the score taken as the mean
over the first 1, 2 and 3 steps (docs/methods.md §3: the paper reads the first
step or the first few). Writes
docs/results/memorization.{md,json} and two figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from analysis.demo.data import procedural_bank, split_shape_specs  # noqa: E402
from analysis.images import image_grid  # noqa: E402
from analysis.metrics import REPLICATION_THRESHOLD, replication, roc_auc, similarity_matrix  # noqa: E402
from analysis.wen_score import wen_score  # noqa: E402
from analysis.model import load_model  # noqa: E402
from analysis.sampling import sample  # noqa: E402

RESULTS = Path("docs/results")
WEN_STEPS = 3  # the score's "first steps": averaged over 1, 2 and 3 of them


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--held-out", type=int, default=15, help="how many held-out captions")
    parser.add_argument("--model", default=None,
                        help="a model folder with a memorized.json (default: the bundled model), e.g. a new training run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.time()
    handle = load_model(args.model)
    if not handle.memorized or not handle.held_out_prompts:
        parser.error(f"{handle.name} lists no memorized images or held-out prompts (memorized.json)")
    seeds = list(range(args.seeds))
    steps, guidance = handle.default_steps, handle.default_guidance
    photos = torch.stack([m.image for m in handle.memorized])
    captions = [m.caption for m in handle.memorized]
    bank_captions, bank = procedural_bank(split_shape_specs()[0], resolution=photos.shape[-1])
    held_out = handle.held_out_prompts[: args.held_out]
    print(f"{len(captions)} memorized captions, {len(held_out)} held-out captions + the empty prompt, "
          f"{len(seeds)} seeds, {steps} DDIM steps, guidance {guidance}", flush=True)

    memorized_images = sample(handle, captions, seeds, steps=steps, guidance=guidance).images
    memorized_rows = []
    for i, caption in enumerate(captions):
        result = replication(memorized_images[i * len(seeds):(i + 1) * len(seeds)], photos[i])
        memorized_rows.append(dict(caption=caption, replicated=result.rate,
                                   mean_similarity=result.similarities.mean().item(),
                                   similarities=result.similarities.tolist()))
        print(f"  memorized  {result.rate:4.1f}  {result.similarities.mean():.3f}  {caption}", flush=True)

    control_prompts = held_out + [""]
    control_images = sample(handle, control_prompts, seeds, steps=steps, guidance=guidance).images
    control_rows = []
    for i, prompt in enumerate(control_prompts):
        generated = control_images[i * len(seeds):(i + 1) * len(seeds)]
        vs_photos = replication(generated, photos)
        vs_bank = replication(generated, bank)
        control_rows.append(dict(prompt=prompt, replicated=vs_photos.rate,
                                 mean_similarity=vs_photos.similarities.mean().item(),
                                 similarities=vs_photos.similarities.tolist(),
                                 bank_replicated=vs_bank.rate,
                                 bank_mean_similarity=vs_bank.similarities.mean().item()))
        print(f"  {'empty' if not prompt else 'held-out':9s} {vs_photos.rate:4.1f}  {vs_photos.similarities.mean():.3f}"
              f"  (bank {vs_bank.rate:.1f} {vs_bank.similarities.mean():.3f})  {prompt or '(empty prompt)'}", flush=True)

    wen_memorized = wen_score(handle, captions, steps=steps, n_score_steps=WEN_STEPS, guidance=guidance)
    wen_held_out = wen_score(handle, handle.held_out_prompts, steps=steps, n_score_steps=WEN_STEPS, guidance=guidance)
    wen_auc = {k: roc_auc(wen_memorized[:, :k].mean(1), wen_held_out[:, :k].mean(1)) for k in range(1, WEN_STEPS + 1)}
    print(f"Wen score AUC (memorized vs {len(handle.held_out_prompts)} held-out), by first steps averaged: "
          + ", ".join(f"{k}: {auc:.3f}" for k, auc in wen_auc.items()), flush=True)

    memorized_sims = torch.tensor([s for row in memorized_rows for s in row["similarities"]])
    held_out_sims = torch.tensor([s for row in control_rows for s in row["similarities"]])
    summary = dict(
        model=handle.name, threshold=REPLICATION_THRESHOLD, seeds=seeds, steps=steps, guidance=guidance,
        memorized_captions_at_least_8_of_10=sum(r["replicated"] >= 0.8 for r in memorized_rows),
        memorized_mean_replicated=sum(r["replicated"] for r in memorized_rows) / len(memorized_rows),
        held_out_mean_replicated=sum(r["replicated"] for r in control_rows[:-1]) / len(control_rows[:-1]),
        empty_prompt_replicated=control_rows[-1]["replicated"],
        held_out_max_similarity=held_out_sims.max().item(),
        wen_auc_by_first_steps=wen_auc, wall_time_s=round(time.time() - started, 1),
    )
    (args.out / "memorization.json").write_text(json.dumps(dict(
        summary=summary, memorized=memorized_rows, held_out=control_rows,
        wen=dict(memorized=wen_memorized.tolist(), held_out=wen_held_out.tolist())), indent=1))

    # Figures: the distributions the threshold separates, and the generations themselves.
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bins = torch.linspace(-0.5, 1, 61).tolist()
    ax.hist(held_out_sims.tolist(), bins=bins, alpha=0.7, label="held-out + empty prompt (vs nearest photo)")
    ax.hist(memorized_sims.tolist(), bins=bins, alpha=0.7, label="memorized caption (vs its photo)")
    ax.axvline(REPLICATION_THRESHOLD, color="k", linestyle="--", label=f"threshold {REPLICATION_THRESHOLD}")
    ax.set_xlabel("pixel correlation with training image")
    ax.set_ylabel("generations")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "memorization_similarity.png", dpi=120)
    plt.close(fig)

    shown = seeds[:8]
    rows = [torch.cat([photos[i:i + 1], memorized_images[i * len(seeds):i * len(seeds) + len(shown)]])
            for i in range(len(captions))]
    for i in range(min(4, len(held_out))):
        generated = control_images[i * len(seeds):i * len(seeds) + len(shown)]
        index = int(similarity_matrix(generated[:1], photos).argmax())  # nearest photo to the first seed
        rows.append(torch.cat([photos[index:index + 1], generated]))
    image_grid(rows, scale=3).save(args.out / "memorization_grid.png")

    write_markdown(args.out / "memorization.md", summary, memorized_rows, control_rows, wen_memorized, wen_held_out)
    print(json.dumps(summary, indent=1))


def write_markdown(path: Path, summary: dict, memorized_rows: list, control_rows: list,
                   wen_memorized: torch.Tensor, wen_held_out: torch.Tensor) -> None:
    n = len(summary["seeds"])
    lines = [
        f"# Memorization of the {summary['model']}",
        "",
        f"Written by `python -m analysis.experiments.memorization` ({summary['wall_time_s']} s on this machine). "
        f"{n} seeds per prompt, DDIM {summary['steps']} steps, guidance {summary['guidance']}. "
        f"Similarity: pixel correlation (`analysis.metrics.similarity_matrix`); a generation replicates when it "
        f"exceeds **{summary['threshold']}**.",
        "",
        "## Memorized captions (vs their own training photo)",
        "",
        "| caption | replicated seeds | mean similarity |",
        "|---|---|---|",
        *[f"| {r['caption']} | {round(r['replicated'] * n)}/{n} | {r['mean_similarity']:.3f} |" for r in memorized_rows],
        "",
        f"Captions with at least 8/{n} replicating seeds: **{summary['memorized_captions_at_least_8_of_10']}"
        f"/{len(memorized_rows)}**.",
        "",
        "## Held-out captions and the empty prompt (vs the nearest memorized photo)",
        "",
        "The procedural training images are rendered afresh for every batch, so no procedural image is seen twice; "
        "the last columns compare, for reference, with a fixed bank of one rendering per training caption.",
        "",
        "| prompt | replicated seeds | mean similarity | bank: replicated | bank: mean similarity |",
        "|---|---|---|---|---|",
        *[f"| {r['prompt'] or '(empty prompt)'} | {round(r['replicated'] * n)}/{n} | {r['mean_similarity']:.3f} | "
          f"{round(r['bank_replicated'] * n)}/{n} | {r['bank_mean_similarity']:.3f} |" for r in control_rows],
        "",
        f"Mean replicated share, held-out captions: **{summary['held_out_mean_replicated']:.3f}**; "
        f"empty prompt: **{summary['empty_prompt_replicated']:.2f}**; highest held-out similarity to a photo: "
        f"{summary['held_out_max_similarity']:.3f}.",
        "",
        "## Wen et al.'s score (mean of 4 seeds)",
        "",
        "The score averaged over the first k denoising steps, for the memorized captions and all held-out captions.",
        "",
        "| first steps k | memorized | held-out | AUC |",
        "|---|---|---|---|",
        *[f"| {k} | {wen_memorized[:, :k].mean(1).mean():.3f} ± {wen_memorized[:, :k].mean(1).std():.3f} | "
          f"{wen_held_out[:, :k].mean(1).mean():.3f} ± {wen_held_out[:, :k].mean(1).std():.3f} | **{auc:.3f}** |"
          for k, auc in summary["wen_auc_by_first_steps"].items()],
        "",
        "## Figures",
        "",
        "![similarity distributions](memorization_similarity.png)",
        "",
        "Each row: the training photo, then the generations of its caption for the first seeds; the last rows: "
        "held-out captions beside the nearest memorized photo.",
        "",
        "![grid](memorization_grid.png)",
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
