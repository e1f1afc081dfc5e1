"""The Dori experiment's report: dori.md and dori.json, rewritten after every section, and its figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from analysis.metrics import REPLICATION_THRESHOLD


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

