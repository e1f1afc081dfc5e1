"""Is memorization in the bundled model local? Dori against NeMo and Wanda, and the non-locality analyses.

    python -m analysis.experiments.dori [--images 0 1 2] [--seeds 4] [--agreement-triggers 4] [--triggers N]

Sections (docs/methods.md §6–7), each written to docs/results/dori.md and
dori.json as soon as it is done, so an interrupted run still reports what it measured:

1. Replication under a mask and under a mask + Dori: for each chosen
   memorized image, its caption generated with `--seeds` seeds with the NeMo
   mask and with the Wanda mask (from `python -m analysis.experiments.mitigation`,
   runs/mitigation_masks, fitted here when missing); then a Dori search (lr 0.1,
   50 steps, batch 8) against the masked model from the caption's own embedding,
   generated with the same mask and seeds.
2. Control: Dori from the caption of a never-trained image (a held-out shape
   rendering, two scikit-image photos) toward that image, 50 steps,
   unmitigated model. The paper: replication stays ~0.
3. Dispersion: Dori triggers from random starts for image 0 (the shipped set,
   or `--triggers` new ones in runs/dori_triggers, resumable), pairwise L2
   beside memorized prompts, held-out prompts and the random starts; a UMAP map.
4. Activation discrepancy at the first denoising step, per layer: embeddings
   that replicate image 0 (its caption and its replicating triggers) versus
   the captions of different memorized images.
5. Mask agreement: NeMo and Wanda masks for the caption and the first
   `--agreement-triggers` replicating triggers of image 0; pairwise IoU per
   layer, and NeMo versus Wanda on NeMo's layers at neuron level.

Figures: dori.png (matplotlib) and dori.html (plotly, the embedding map and the bars).
`--only-control` reruns section 2 alone into an existing dori.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from analysis.agreement import iou_matrix, localize_each
from analysis.demo.data import load_photo, render_shapes, split_shape_specs
from analysis.discrepancy import activation_discrepancy
from analysis.dispersion import dispersion, reference_sets
from analysis.dori import DoriSearch, Start, evaluate
from analysis.hooks import nemo_layers
from analysis.localize.nemo import NeMo
from analysis.localize.saved import LOCALIZER_SEEDS, saved_mask
from analysis.localize.wanda import Wanda
from analysis.metrics import REPLICATION_THRESHOLD, similarity_matrix
from analysis.model import REPO_ROOT, ModelHandle, load_model
from analysis.projection import Projection
from analysis.sampling import encode_prompts
from analysis.triggers import TriggerSet, build_trigger_set, shipped_set_folder

RESULTS = Path("docs/results")
TRIGGERS = REPO_ROOT / "runs" / "dori_triggers"


# Never-trained photographs shipped with scikit-image, beside the held-out shape rendering: a control of the
# same kind as the memorized photos, so that an easy-to-draw shape does not flatter or spoil the control.
NEVER_TRAINED_PHOTOS = {"retina": "fundus photograph of a human retina",
                        "moon": "the cratered surface of the moon in black and white"}


def never_trained_images() -> list[tuple[str, torch.Tensor]]:
    """(caption, image) pairs never in training: the first held-out shape caption's rendering and two photos."""
    spec = split_shape_specs()[1][0]
    pairs = [(spec.caption, render_shapes([spec], torch.Generator().manual_seed(0))[0])]
    return pairs + [(caption, load_photo(name)) for name, caption in NEVER_TRAINED_PHOTOS.items()]


def nearest_training_shape(image: torch.Tensor) -> tuple[str, float]:
    """The trained shape caption whose rendering (seed 0) correlates best with `image`, and that correlation."""
    specs = split_shape_specs()[0]
    similarities = similarity_matrix(image[None], render_shapes(specs, torch.Generator().manual_seed(0)))[0]
    best = int(similarities.argmax())
    return specs[best].caption, similarities[best].item()


def replication_under_masks(handle: ModelHandle, indices: list[int], seeds: list[int], steps: int) -> list[dict]:
    rows = []
    for index in indices:
        target = handle.memorized[index]
        for method in ("nemo", "wanda"):
            started = time.time()
            mask = saved_mask(handle, method, index)
            with mask.applied(handle):
                mitigated = evaluate(handle, encode_prompts(handle, [target.caption]).float(), target.image, seeds)
                result = DoriSearch(steps=steps, seed=index).fit(handle, target.image, [Start.prompt(target.caption)],
                                                    prompt=target.caption)
                attacked = evaluate(handle, result.embeddings, target.image, seeds)
            rows.append(dict(image=index, caption=target.caption, method=method,
                             units_removed=sum(mask.counts().values()), mask_parameters=mask.parameters,
                             rate=mitigated.rates.item(), similarity=mitigated.similarities.mean().item(),
                             rate_dori=attacked.rates.item(), similarity_dori=attacked.similarities.mean().item(),
                             distance_from_prompt=result.from_prompt.l2.norm().item(),
                             seconds=time.time() - started))
            print(f"image {index} {method}: replication {rows[-1]['rate']:.2f} -> with Dori "
                  f"{rows[-1]['rate_dori']:.2f}", flush=True)
    return rows


def control(handle: ModelHandle, seeds: list[int], steps: int) -> dict:
    """Dori from each never-trained image's caption toward that image, on the unmitigated model."""
    rows = []
    for caption, image in never_trained_images():
        result = DoriSearch(steps=steps).fit(handle, image, [Start.prompt(caption)], prompt=caption)
        before = evaluate(handle, result.starts, image, seeds)
        after = evaluate(handle, result.embeddings, image, seeds)
        nearest, nearest_similarity = nearest_training_shape(image)
        drawn = evaluate(handle, encode_prompts(handle, [nearest]).float(), image, seeds)
        rows.append(dict(caption=caption, nearest_shape=nearest, nearest_shape_similarity=nearest_similarity,
                         nearest_shape_generated_similarity=drawn.similarities.mean().item(),
                         rate_before=before.rates.item(),
                         similarity_before=before.similarities.mean().item(), rate=after.rates.item(),
                         similarity=after.similarities.mean().item(), loss_first=result.losses[:5].mean().item(),
                         loss_last=result.losses[-5:].mean().item()))
    return dict(steps=steps, images=rows, rate=float(np.mean([r["rate"] for r in rows])))


def replicating(trigger_set) -> torch.Tensor:
    """Indices of the triggers that replicated with at least one evaluation seed."""
    return torch.tensor([i for i, t in enumerate(trigger_set.triggers) if t["replication_rate"] > 0], dtype=torch.long)


def mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


class Report:
    """Collects the sections' numbers and rewrites dori.md / dori.json after each one."""

    def __init__(self, out: Path, data: dict):
        self.out, self.data = out, data
        out.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, value) -> None:
        self.data[name] = value
        public = {key: value for key, value in self.data.items() if not key.startswith("_")}  # "_": figures only
        (self.out / "dori.json").write_text(json.dumps(public, indent=1))
        (self.out / "dori.md").write_text(markdown(self.data))


def fmt(value: float | None, digits: int = 2) -> str:
    return "undefined" if value is None else f"{value:.{digits}f}"


def section(title: str, text: str, columns: list[str]) -> list[str]:
    """A report section's heading, text and table header."""
    return [f"## {title}", "", text, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def markdown(data: dict) -> str:
    lines = ["# Dori and the non-locality of memorization on the bundled demo model", "",
             f"Written by `{data['command']}`" +
             (f" (section 2 by `{data['control_command']}`)" if "control_command" in data else "") +
             ". A generation replicates when its pixel correlation with the training "
             f"image exceeds {REPLICATION_THRESHOLD}. Every Dori search: Adam, lr 0.1, "
             f"{data['settings']['steps']} steps, batch 8, from the caption's own embedding unless said otherwise. "
             "Numbers are measured by this run; sections missing below were not reached.", ""]
    if "replication" in data:
        rows = data["replication"]
        lines += section("1. Replication under NeMo and Wanda masks, and with Dori",
                         f"Each caption generated with {data['settings']['seeds']} seeds under the mask, then a Dori "
                         "search from its embedding against the masked model, generated with the same mask and seeds.",
                         ["image", "method", "units removed", "replication (similarity)", "+ Dori",
                          "moved from prompt (L2)"])
        lines += [f"| {r['caption']} | {r['method']} | {r['units_removed']} | {r['rate']:.2f} ({r['similarity']:.2f}) "
                  f"| **{r['rate_dori']:.2f}** ({r['similarity_dori']:.2f}) | {r['distance_from_prompt']:.1f} |"
                  for r in rows]
        means = data["replication_means"]
        lines += ["", f"Mean replication: NeMo **{means['nemo']:.2f}**, NeMo + Dori **{means['nemo_dori']:.2f}** "
                  f"(paper target ≥ 0.8), Wanda **{means['wanda']:.2f}**, Wanda + Dori **{means['wanda_dori']:.2f}** "
                  "(paper target ≥ 0.6). The masks come from the mitigation experiment (runs/mitigation_masks)." +
                  (" Here they do not stop replication in the first place (paper: NeMo 0.20, Wanda 0.00; see "
                   "docs/results/mitigation.md), so Dori has nothing to undo and the targets say little."
                   if min(means["nemo"], means["wanda"]) >= 0.5 else ""), ""]
    if "control" in data:
        c = data["control"]
        lines += section("2. Control: Dori toward never-trained images",
                         f"From each image's caption toward the image (never in training: the rendering of a "
                         f"held-out shape caption and two scikit-image photos), {c['steps']} steps, unmitigated "
                         f"model, {data['settings']['seeds']} seeds. Loss: mean of the first and of the last 5 steps. "
                         "Nearest trained shape: the trained shape caption whose rendering (one, seed 0) correlates best "
                         "with the image; then that correlation, and the mean similarity to the image of what the "
                         "model generates for that caption with the same seeds (no search): a hint of how close "
                         "the model's own repertoire comes to the image.",
                         ["target", "replication before → after", "similarity before → after", "loss",
                          "nearest trained shape (rendering; generated)"])
        lines += [f"| {r['caption']} | {r['rate_before']:.2f} → **{r['rate']:.2f}** | {r['similarity_before']:.2f} → "
                  f"{r['similarity']:.2f} | {r['loss_first']:.4f} → {r['loss_last']:.4f} | "
                  f"{r['nearest_shape']} ({r['nearest_shape_similarity']:.2f}; "
                  f"{r['nearest_shape_generated_similarity']:.2f}) |" for r in c["images"]]
        lines += ["", f"Mean replication after the search: **{c['rate']:.2f}** (paper target ≤ 0.1).", ""]
    if "dispersion" in data:
        d = data["dispersion"]
        lines += section("3. Dispersion of random-start triggers",
                         f"{d['triggers']} triggers for “{d['caption']}” from random starts ({d['search']}), "
                         f"{d['replicating']} of them replicate with at least one of {d['evaluation_seeds']} "
                         "seed(s). Pairwise L2 distance between whole embeddings (77 tokens × d):",
                         ["set", "size", "mean", "median", "min", "max"])
        lines += [f"| {name} | {s['size']} | {s['mean']:.1f} | {s['median']:.1f} | {s['min']:.1f} | {s['max']:.1f} |"
                  for name, s in d["sets"].items()]
        lines += ["", f"{d['compared']} at least as far apart as different memorized prompts (mean): "
                  f"**{'yes' if d['claim_holds'] else 'no'}**. The map is in dori.html.", ""]
    if "discrepancy" in data:
        d = data["discrepancy"]
        lines += section("4. Activation discrepancy at the first denoising step",
                         "Relative discrepancy (mean pairwise L2 / mean norm of the layer's output, seed 0, first "
                         f"timestep): {d['same_image_count']} embeddings replicating “{d['caption']}” versus the "
                         f"captions of {d['prompt_count']} different memorized images.",
                         ["layer", "same image", "different images", "ratio"])
        lines += [f"| {name} | {v['same_image']:.3f} | {v['different_images']:.3f} "
                  f"| {v['same_image'] / v['different_images']:.2f} |" for name, v in d["layers"].items()]
        ratios = {kind: [v["same_image"] / v["different_images"] for name, v in d["layers"].items() if marker in name]
                  for kind, marker in [("value", ".to_v"), ("feed-forward", ".ff.")]}
        lines += ["", "Mean ratio (same image / different images): " + ", ".join(
            f"{kind} layers **{np.mean(values):.2f}**" for kind, values in ratios.items() if values) +
            ". Value projections read only the text, so there the figure restates how far apart the embeddings are; "
            "feed-forward layers read the image tokens. A ratio ≥ 1 in a layer is the paper's claim (triggers of one "
            "image take paths as different as different prompts do); below 1 the same-image embeddings share more "
            "of their path there.", ""]
    if "agreement" in data:
        a = data["agreement"]
        lines += section("5. Mask agreement",
                         f"Masks for “{a['caption']}” and {a['triggers']} replicating triggers of it. Mean pairwise "
                         "IoU per layer over the pairs of different embeddings whose IoU is defined; undefined pairs: "
                         "the share where both masks are empty in that layer (no IoU, not counted as agreement).",
                         ["method", "layer", "mean IoU", "undefined pairs"])
        for method in ("nemo", "wanda"):
            lines += [f"| {method} | {layer} | {fmt(v['mean'])} | {v['undefined']:.2f} |"
                      for layer, v in a[method].items()]
        lines += ["", "NeMo versus Wanda (Wanda run on NeMo's value layers, compared at neuron level), same embedding:",
                  "", "| layer | mean IoU | undefined pairs |", "|---|---|---|"]
        # NeMo's layers only: elsewhere NeMo removes nothing by construction.
        lines += [f"| {layer} | {fmt(v['mean'])} | {v['undefined']:.2f} |" for layer, v in a["between"].items()
                  if layer in a["nemo"]]
        lines += [""]
    if "figures" in data:
        lines += ["![Dori results](dori.png)", "", "Interactive: [dori.html](dori.html).", ""]
    return "\n".join(lines)


def figures(data: dict, map_points: dict[str, np.ndarray], out: Path) -> None:
    """dori.png (matplotlib) and dori.html (plotly): replication bars, distance histograms, discrepancy, IoU, map."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    means = data["replication_means"]
    bars = {"NeMo": means["nemo"], "NeMo + Dori": means["nemo_dori"], "Wanda": means["wanda"],
            "Wanda + Dori": means["wanda_dori"], "held-out + Dori": data["control"]["rate"]}
    layers = list(data["discrepancy"]["layers"])
    same = [data["discrepancy"]["layers"][n]["same_image"] for n in layers]
    different = [data["discrepancy"]["layers"][n]["different_images"] for n in layers]

    fig, axes = plt.subplots(1, 4, figsize=(22, 4.5))
    axes[0].bar(list(bars), list(bars.values()), color=["#888", "#c33", "#888", "#c33", "#36c"])
    axes[0].set_ylim(0, 1)
    axes[0].set_ylabel("replication rate")
    axes[0].tick_params(axis="x", rotation=30)
    for name, distances in data["_distances"].items():
        axes[1].hist(distances, bins=40, alpha=0.5, density=True, label=name)
    axes[1].set_xlabel("pairwise L2 distance")
    axes[1].legend(fontsize=7)
    position = np.arange(len(layers))
    axes[2].bar(position - 0.2, same, 0.4, label="same image")
    axes[2].bar(position + 0.2, different, 0.4, label="different images")
    axes[2].set_xticks(position, layers, rotation=90, fontsize=6)
    axes[2].set_ylabel("relative activation discrepancy")
    axes[2].legend(fontsize=7)
    for name, xy in map_points.items():
        axes[3].scatter(xy[:, 0], xy[:, 1], s=8, label=name)
    axes[3].set_title("UMAP of embeddings")
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "dori.png", dpi=110)
    plt.close(fig)

    page = make_subplots(rows=2, cols=2, subplot_titles=("replication rate", "embedding map (UMAP)",
                                                          "pairwise L2 distances", "relative activation discrepancy"))
    page.add_trace(go.Bar(x=list(bars), y=list(bars.values()), showlegend=False), row=1, col=1)
    for name, xy in map_points.items():
        page.add_trace(go.Scatter(x=xy[:, 0], y=xy[:, 1], mode="markers", name=name), row=1, col=2)
    for name, distances in data["_distances"].items():
        page.add_trace(go.Histogram(x=distances, name=f"{name} distances", opacity=0.5, histnorm="probability"),
                       row=2, col=1)
    page.add_trace(go.Bar(x=layers, y=same, name="same image"), row=2, col=2)
    page.add_trace(go.Bar(x=layers, y=different, name="different images"), row=2, col=2)
    page.update_layout(height=900, barmode="overlay", title="Dori on the bundled demo model")
    page.write_html(out / "dori.html", include_plotlyjs="cdn")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[0, 1, 2], help="memorized images for section 1")
    parser.add_argument("--seeds", type=int, default=4, help="generation seeds per embedding")
    parser.add_argument("--triggers", type=int, help="random-start triggers for the dispersion, searched into "
                        "--triggers-dir (default: the shipped set of image 0, assets/triggers/image-0)")
    parser.add_argument("--trigger-batch", type=int, default=2, help="(ε, t) pairs per trigger start and step")
    parser.add_argument("--agreement-triggers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50, help="steps of every Dori search")
    parser.add_argument("--triggers-dir", type=Path, default=TRIGGERS / "image-0")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--only-control", action="store_true", help="rerun section 2 only, with the seeds and steps "
                        "of the existing dori.json of --out (the other sections and the figures stay as they are)")
    args = parser.parse_args(argv)
    command = ("python -m analysis.experiments.dori --images " + " ".join(map(str, args.images)) +
               f" --seeds {args.seeds} --agreement-triggers {args.agreement_triggers} --steps {args.steps}" +
               ("" if args.triggers is None else f" --triggers {args.triggers} --trigger-batch {args.trigger_batch}"))
    handle = load_model()
    seeds = list(range(args.seeds))
    if args.only_control:
        # The recorded run's seeds and steps, so that section 2 stays comparable with the others.
        report = Report(args.out, json.loads((args.out / "dori.json").read_text()))
        report.data["control_command"] = "python -m analysis.experiments.dori --only-control"
        settings = report.data["settings"]
        report.add("control", control(handle, list(range(settings["seeds"])), settings["steps"]))
        return
    report = Report(args.out, dict(command=command, settings=dict(steps=args.steps, seeds=args.seeds)))

    rows = replication_under_masks(handle, args.images, seeds, args.steps)
    report.data["replication_means"] = {
        key: float(np.mean([r[field] for r in rows if r["method"] == method]))
        for key, method, field in [("nemo", "nemo", "rate"), ("nemo_dori", "nemo", "rate_dori"),
                                   ("wanda", "wanda", "rate"), ("wanda_dori", "wanda", "rate_dori")]}
    report.add("replication", rows)
    report.add("control", control(handle, seeds, args.steps))
    print(f"control: {report.data['control']['rate']:.2f}", flush=True)

    # 3. Dispersion of random-start triggers of image 0.
    target = handle.memorized[0]
    if args.triggers is None:
        trigger_set = TriggerSet.load(shipped_set_folder(0))
    else:
        search = DoriSearch(steps=args.steps, batch_size=args.trigger_batch)
        trigger_set = build_trigger_set(handle, args.triggers_dir, target, count=args.triggers, search=search,
                                        starts_per_batch=25, evaluation_seeds=[0])
    search_config = trigger_set.config["search"]
    chosen = replicating(trigger_set)
    # The claim is about triggers that work; with fewer than 2 of them all triggers stand in, and the report says so.
    compared = "triggers (replicating)" if len(chosen) >= 2 else "triggers (all)"
    sets = {"triggers (all)": trigger_set.embeddings}
    if len(chosen) >= 2:
        sets[compared] = trigger_set.embeddings[chosen]
    sets.update(reference_sets(handle, len(trigger_set.triggers)))
    sets["random starts"] = sets.pop("random")
    summaries = dispersion(sets)
    report.data["_distances"] = {name: s.distances.tolist() for name, s in summaries.items()}
    report.add("dispersion", dict(
        caption=target.caption, triggers=len(trigger_set.triggers), replicating=len(chosen),
        evaluation_seeds=len(trigger_set.config["evaluation"]["seeds"]),
        search=f"{search_config['steps']} steps, batch {search_config['batch_size']} per start",
        sets={n: s.as_dict() for n, s in summaries.items()},
        compared=compared, claim_holds=summaries[compared].mean >= summaries["memorized prompts"].mean))
    map_sets = {name: embeddings for name, embeddings in sets.items() if name != "triggers (replicating)"}
    projection = Projection("umap").fit(torch.cat(list(map_sets.values())))
    bounds = np.cumsum([0] + [len(embeddings) for embeddings in map_sets.values()])
    map_points = {name: projection.reference_xy_[bounds[i]:bounds[i + 1]] for i, name in enumerate(map_sets)}

    # 4. Discrepancy: embeddings replicating image 0 versus different memorized captions.
    caption_embedding = encode_prompts(handle, [target.caption]).float().cpu()
    same_image = torch.cat([caption_embedding, sets[compared]])
    prompts = encode_prompts(handle, [m.caption for m in handle.memorized]).float().cpu()
    layers = {}
    for kind in ("value", "ff"):
        ours, theirs = activation_discrepancy(handle, same_image, kind), activation_discrepancy(handle, prompts, kind)
        layers.update({name: dict(same_image=a, different_images=b) for name, a, b in
                       zip(ours.layers, ours.relative.tolist(), theirs.relative.tolist())})
    report.add("discrepancy", dict(caption=target.caption, same_image_count=len(same_image),
                                   prompt_count=len(prompts), layers=layers))
    figures(report.data, map_points, args.out)  # before the agreement: NeMo per trigger is the slowest part
    report.add("figures", ["dori.png", "dori.html"])

    # 5. Agreement between masks of different embeddings of image 0, and between methods.
    embeddings = same_image[:1 + args.agreement_triggers]
    masks = {method: localize_each(localizer, handle, embeddings, seeds=LOCALIZER_SEEDS)
             for method, localizer in (("nemo", NeMo()), ("wanda", Wanda()))}
    wanda_on_nemo_layers = Wanda(layers=list(nemo_layers(handle.unet)))
    wanda_on_values = localize_each(wanda_on_nemo_layers, handle, embeddings, seeds=LOCALIZER_SEEDS)
    agreement = dict(caption=target.caption, triggers=len(embeddings) - 1)
    for method, method_masks in masks.items():
        matrix = iou_matrix(method_masks)
        agreement[method] = {layer: dict(mean=matrix.layer_means()[layer], undefined=matrix.undefined_shares()[layer])
                             for layer in matrix.layers}
    between = iou_matrix(masks["nemo"], wanda_on_values, level="neurons")
    diagonal = torch.eye(len(embeddings), dtype=torch.bool)
    agreement["between"] = {
        layer: dict(mean=mean_or_none(values[diagonal & ~undefined].tolist()),
                    undefined=undefined[diagonal].float().mean().item())
        for layer, values, undefined in zip(between.layers, between.values, between.undefined)}
    report.add("agreement", agreement)
    print(f"wrote {args.out / 'dori.md'}")


if __name__ == "__main__":
    main()
