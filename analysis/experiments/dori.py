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

Figures (`dori_report`): dori.png (matplotlib) and dori.html (plotly, the embedding map and the bars).
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
from analysis.experiments.dori_report import Report, figures
from analysis.hooks import nemo_layers
from analysis.localize.nemo import NeMo
from analysis.localize.saved import LOCALIZER_SEEDS, saved_mask
from analysis.localize.wanda import Wanda
from analysis.metrics import similarity_matrix
from analysis.model import ModelHandle, load_model
from analysis.paths import RUNS_DIR
from analysis.projection import Projection
from analysis.sampling import encode_prompts
from analysis.triggers import TriggerSet, build_trigger_set, shipped_set_folder

RESULTS = Path("docs/results")
TRIGGERS = RUNS_DIR / "dori_triggers"


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
