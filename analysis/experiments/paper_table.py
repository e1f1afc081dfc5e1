"""The paper's table on any model: replication before and after each mitigation, and after a Dori search against it.

    python -m analysis.experiments.paper_table --model ~/models/stable-diffusion-v1-4 --memorized data/sd14-memorized \\
        --controls data/coco-controls --sscd ~/models/sscd_disc_mixup.torchscript.pt --device cuda \\
        --out-dir runs/paper-table --executor ray       # one task per image, one GPU each

Rows, as in Kowalczuk et al. (2025), Table 1: the memorized images as they
are (original); under NeMo's neuron mask and under Wanda's weight mask; each
mask attacked by a Dori search from the caption's embedding (the paper's
"small perturbation" of the mitigated prompt); images the model never
memorized (`--controls`, an imagefolder) attacked the same way, the control
that Dori finds memorized images rather than making any image; and the model
adversarially fine-tuned on the image, attacked the same way. Each row gives
the mean over images of each image's mean similarity over its seeds (± their
std), and the memorization rate: the share of images replicating on at least
half of their seeds, by the model's replication metric, which the table names.

One image is one task (`analysis.campaign.run_items`): its rows are written to
`OUT/items/` as soon as they are done, a rerun skips finished images, and Ray
runs the tasks on a cluster. The table goes to `OUT/table.md` and `--report`.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
from pathlib import Path

from analysis.campaign import MODEL_SETTINGS, model_for, run_items, summarize
from analysis.dori import DoriSearch
from analysis.memorized import load_memorized_set
from analysis.model import load_model
from analysis.task_settings import mask_tensors, record_mask
from analysis.tasks import run_task

ROWS = ("original", "NeMo", "NeMo + Dori", "Wanda", "Wanda + Dori", "control + Dori",
        "adversarial fine-tuning + Dori")
MIN_SHARE = 0.5
FROM_CAPTION = [{"kind": "prompt"}]  # Dori starts at the caption's own embedding


def image_rows(item: dict, config: dict) -> dict:
    """Every row of the table for one item: a memorized image, or a control image (`control + Dori` only).

    A row is `{"similarity", "share"}`: the mean similarity over the seeds and the share of them that replicate.
    """
    handle = model_for(config)
    seeds, search = config["seeds"], config["search"]
    if item["kind"] == "control":
        control = controls_of(handle, config)[item["index"]]
        attacked = run_task(handle, "attack", dict(prompt=control.caption, starts=FROM_CAPTION, search=search,
                                                    evaluation_seeds=seeds), inputs={"target": control.image})
        return dict(item=item, rows={"control + Dori": attack_row(attacked)})
    index = item["index"]
    replicated = run_task(handle, "replicate", dict(image=index, seeds=seeds)).metrics
    rows = {"original": dict(similarity=replicated["mean_similarity"], share=replicated["rate"])}
    for method, name in (("nemo", "NeMo"), ("wanda", "Wanda")):
        localized = run_task(handle, "localize", dict(image=index, method=method, parameters=config[method],
                                                      evaluation_seeds=seeds))
        rows[name] = dict(similarity=localized.metrics["after_mean_similarity"], share=localized.metrics["after_rate"])
        attacked = run_task(handle, "attack", dict(image=index, starts=FROM_CAPTION, search=search,
                                                    evaluation_seeds=seeds, mitigation={"method": "mask"}),
                            inputs=mask_tensors(record_mask(localized)))
        rows[f"{name} + Dori"] = attack_row(attacked)
    with tempfile.TemporaryDirectory(prefix="paper-table-finetune-") as folder:
        tuned = run_task(handle, "finetune", dict(targets=[index], out_dir=folder, parameters=config["finetune"]))
        tuned_handle = load_model(tuned.metrics["model_dir"], device=handle.device, dtype=handle.dtype,
                                  replication_metric=handle.replication_metric)
        attacked = run_task(tuned_handle, "attack", dict(image=index, starts=FROM_CAPTION, search=search,
                                                          evaluation_seeds=seeds))
    rows["adversarial fine-tuning + Dori"] = attack_row(attacked)
    return dict(item=item, rows=rows, metric=handle.replication_metric.label())


def attack_row(record) -> dict:
    """The Dori search's one start: its generations' mean similarity and replicating share."""
    return dict(similarity=record.metrics["mean_similarity"][0], share=record.metrics["rate"][0])


def table(results: list[dict], min_share: float = MIN_SHARE) -> list[dict]:
    """One line per row of `ROWS` that any item measured: `summarize`d over the items that have it."""
    lines = []
    for row in ROWS:
        scores = [(result["rows"][row]["similarity"], result["rows"][row]["share"]) for result in results
                  if row in result["rows"]]
        if scores:
            lines.append(dict(row=row, images=len(scores), **summarize(scores, min_share)))
    return lines


def table_markdown(lines: list[dict], metric: str, min_share: float = MIN_SHARE) -> str:
    head = [f"| setting | images | mean {metric} ± std | memorization rate (≥ {min_share:g} of seeds replicate) |",
            "|---|---|---|---|"]
    return "\n".join(head + [f"| {line['row']} | {line['images']} | {line['similarity_mean']:.3f} ± "
                             f"{line['similarity_std']:.3f} | {line['mr']:.2f} |" for line in lines])


def items_of(config: dict, images: list[int] | None) -> list[dict]:
    """One item per memorized image (all, or `images`) and per control image."""
    handle = model_for(config)
    chosen = range(len(handle.memorized)) if images is None else images
    for index in chosen:
        if not 0 <= index < len(handle.memorized):
            raise ValueError(f"image {index} does not exist: the model has {len(handle.memorized)} memorized images")
    items = [dict(id=f"image-{index:04d}", kind="memorized", index=index) for index in chosen]
    items += [dict(id=f"control-{index:04d}", kind="control", index=index)
              for index in range(len(controls_of(handle, config)))]
    return items


def controls_of(handle, config: dict) -> list:
    """The control images: `--controls`, else the model folder's own (`ModelHandle.controls`; none for SD)."""
    if config["controls"] is None:
        return handle.controls
    return load_memorized_set(config["controls"], handle.tokenizer, handle.image_size)


def run(config: dict, out_dir: str | Path, images: list[int] | None = None, executor: str = "local",
        address: str | None = None, workers: int | None = None, callback=None) -> dict:
    """Compute every missing item in `out_dir`, then the table; returns `{"table", "markdown", "computed"}`."""
    results, computed = run_items(items_of(config, images), functools.partial(image_rows, config=config),
                                  dict(experiment="paper_table", config=config), out_dir, executor, address, workers,
                                  callback)
    lines = table(results)
    markdown = table_markdown(lines, model_for(config).replication_metric.label())
    (Path(out_dir) / "table.md").write_text(markdown + "\n")
    return dict(table=lines, markdown=markdown, computed=computed)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="diffusers SD folder or hub id (default: the bundled model)")
    parser.add_argument("--memorized", help="the memorized set (imagefolder); default: the model folder's")
    parser.add_argument("--reference-prompts", help="non-memorized prompts for NeMo and Wanda")
    parser.add_argument("--sscd", help="judge replication by SSCD (TorchScript file)")
    parser.add_argument("--sscd-threshold", type=float)
    parser.add_argument("--normal", help="ordinary pairs for fine-tuning (imagefolder)")
    parser.add_argument("--controls", help="never-memorized images with captions (imagefolder): the control row "
                                           "(default: the model folder's controls/, which the bundled model has)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--images", type=int, nargs="*", help="memorized images to measure (default: all)")
    parser.add_argument("--seeds", type=int, default=10, help="generations per image and setting (seeds 0..N-1)")
    parser.add_argument("--search-steps", type=int, default=DoriSearch.steps)
    parser.add_argument("--nemo", default="{}", help="NeMo parameters as JSON (default: the model's defaults)")
    parser.add_argument("--wanda", default="{}", help="Wanda parameters as JSON")
    parser.add_argument("--finetune", default="{}", help="adversarial fine-tuning parameters as JSON")
    parser.add_argument("--out-dir", type=Path, required=True, help="one result per image here; resumed if present")
    parser.add_argument("--executor", choices=["local", "ray"], default="local")
    parser.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    parser.add_argument("--report", type=Path, help="also write the table with its settings to this markdown file")
    args = parser.parse_args(argv)
    config = {name: getattr(args, name) for name in MODEL_SETTINGS}
    config.update(controls=args.controls, seeds=list(range(args.seeds)), search=dict(steps=args.search_steps),
                  nemo=json.loads(args.nemo), wanda=json.loads(args.wanda), finetune=json.loads(args.finetune))
    outcome = run(config, args.out_dir, args.images, args.executor, args.address)
    print(outcome["markdown"])
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(f"# The paper's table on {args.model or 'the bundled model'}\n\nWritten by "
                               f"`python -m analysis.experiments.paper_table` with {json.dumps(config)}.\n\n"
                               f"{outcome['markdown']}\n")


if __name__ == "__main__":
    main()
