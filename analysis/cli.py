"""The `dori` command line: every analysis of the app from a shell, through the same `run_task`.

    dori replicate --image 0 --seeds 0-9
    dori localize --method wanda --image 0 --export wanda.zip
    dori attack --image 0 --mitigation nemo --random-starts 4 --json
    dori finetune --targets 0 --out-dir runs/finetuned --param rounds=2
    dori triggers --image 0 --folder runs/triggers-0 --count 16
    dori map --folder runs/triggers-0 --method pca --export map.zip
    dori attention --image 0 --seed 0 --layers down.1.attn.0 --export maps.zip
    dori timeline --image 0 --folder assets/triggers/image-0 --trigger 0
    dori detect --image 0 --mitigation nemo
    dori rerun wanda.zip
    dori memorized fetch --folder data/sd14-memorized --verbatim-only

Progress bars go to stderr, results to stdout (a short summary, or the whole
record as JSON with `--json`; `--out FILE.json` writes that JSON to a file).
Exit codes: 0 success, 1 a rerun that does not reproduce its numbers or an
unexpected failure, 2 bad input (arguments, configuration, files, model path),
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from analysis.dori import DoriSearch
from analysis.export import RunRecord, compare_metrics, save_export
from analysis.rerun import rerun
from analysis.fetch import DEFAULT_MAX_BYTES, DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, fetch_memorized
from analysis.hooks import KINDS
from analysis.memorized import SD14_MEMORIZED_FILE
from analysis.metrics import SSCD_THRESHOLD
from analysis.model import ModelHandle, ModelLoadError, open_model
from analysis.progress import TaskProgress
from analysis.projection import METHODS
from analysis.task_settings import ATTRIBUTIONS, LOCALIZERS, mask_tensors, record_mask
from analysis.tasks import run_task

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
# Commands that analyse a trigger set (`dori triggers`), and the kind of task each runs.
TRIGGER_SET_KINDS = {"map": "trigger_map", "discrepancy": "discrepancy", "agreement": "agreement"}


class BadInput(ValueError):
    """A command-line value that cannot be used; the message says which."""


def parse_seeds(text: str) -> list[int]:
    """'0-3' -> [0, 1, 2, 3]; '0,5,7' -> [0, 5, 7]; ranges and lists combine ('0-2,9')."""
    seeds = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            seeds.extend(range(int(first), int(last) + 1) if last else [int(first)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must look like '0-9' or '0,3,5', got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r}")
    return seeds


def parse_numbers(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def parse_parameter(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as JSON when it parses (numbers, lists, null), else as a string."""
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"a parameter is KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


class ProgressBars:
    """A callback for `run_task` that shows one tqdm bar per stage on stderr."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.label = ""

    def __call__(self, event: object) -> None:
        if not self.enabled:
            return
        kind = type(event).__name__
        if isinstance(event, TaskProgress):
            label, done, total = event.stage, event.done, event.total
        elif kind == "DoriStep":
            label, done, total = "Dori search", event.index + 1, event.total
        elif kind == "DenoisingStep":
            label, done, total = "sampling", event.index + 1, event.total
        elif kind == "FineTuneProgress":
            label, done, total = f"round {event.round + 1}/{event.rounds}: {event.stage}", event.step + 1, event.total
        else:
            label, done, total = kind, getattr(event, "index", 0) + 1, getattr(event, "total", None)
        if self.bar is None or label != self.label or done <= self.bar.n:
            self.close()
            self.bar = tqdm(total=total, desc=label, file=sys.stderr, leave=False, dynamic_ncols=True)
            self.label = label
        self.bar.update(done - self.bar.n)
        if kind == "DoriStep":
            self.bar.set_postfix(loss=f"{event.loss.mean().item():.4f}", refresh=False)
        if isinstance(event, TaskProgress) and event.message:
            self.bar.set_postfix_str(event.message[:60], refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------------------------------------------------------
# Arguments


def _model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, help="diffusers SD 1.x/2.x folder or hub id (default: the bundled model)")
    group.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    group.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default float32)")
    _data_options(group)


def _data_options(group) -> None:
    """What a model is analysed with besides its weights (recorded in every export, given again to rerun one)."""
    group.add_argument("--memorized", type=Path, metavar="DIR",
                       help="a memorized set: an imagefolder (images + metadata.csv or metadata.jsonl with columns "
                            "file_name and text or caption); replaces the model folder's memorized.json")
    group.add_argument("--reference-prompts", type=Path, metavar="FILE",
                       help="non-memorized prompts (CSV with a prompt/caption column, or JSON) for NeMo, Wanda, the "
                            "trigger map and side effects (default: the model's, else SD v1.4's 500 unmemorized "
                            "LAION prompts)")
    group.add_argument("--sscd", type=Path, metavar="FILE",
                       help="judge replication by SSCD (a TorchScript file, e.g. sscd_disc_mixup.torchscript.pt) "
                            "instead of pixel correlation")
    group.add_argument("--normal", type=Path, metavar="DIR",
                       help="ordinary image-caption pairs for fine-tuning's normal term (an imagefolder as for "
                            "--memorized); default: the model's own generations for its normal prompts (else COCO "
                            "captions), made once and cached")
    group.add_argument("--sscd-threshold", type=float, metavar="T",
                       help=f"SSCD similarity above which a generation is a replica (default {SSCD_THRESHOLD})")


def _output_options(parser: argparse.ArgumentParser, export: bool) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--json", action="store_true", help="print the whole result as JSON on stdout")
    group.add_argument("--out", type=Path, help="write the result as JSON to this file")
    if export:
        group.add_argument("--export", type=Path, help="write the run as a ZIP export (rerun it with `dori rerun`)")
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def _target_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("target")
    group.add_argument("--image", type=int, help="index of a memorized training image (its caption is the prompt)")
    group.add_argument("--prompt", help="a prompt (with --image: the prompt to use instead of the caption)")


def _sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance (default: the model's)")


def _mitigation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mitigation")
    group.add_argument("--mitigation", choices=sorted(LOCALIZERS), help="localize for the prompt and remove the units")
    group.add_argument("--mask", type=Path, help="a mask file (safetensors, e.g. from `dori localize --save-mask`)")
    group.add_argument("--param", type=parse_parameter, action="append", default=[], metavar="KEY=VALUE",
                       help="a parameter of the localizer or attribution method (repeatable; JSON values)")


def _trigger_set_options(parser: argparse.ArgumentParser, count: bool, default_count: int | None = None) -> None:
    group = parser.add_argument_group("trigger set")
    group.add_argument("--folder", type=Path, required=True, help="a trigger set's folder (from `dori triggers`)")
    if count:
        group.add_argument("--count", type=int, default=default_count,
                           help=f"use the first N triggers (default: {default_count or 'all'})")


def _inside_options(parser: argparse.ArgumentParser) -> None:
    """A trigger of a set to analyse instead of the prompt, sampling options and a mitigation."""
    group = parser.add_argument_group("trigger (instead of the prompt)")
    group.add_argument("--folder", type=Path, help="a trigger set's folder (from `dori triggers`, or assets/triggers/...)")
    group.add_argument("--trigger", type=int, help="the index of the trigger in --folder")
    _sampling_options(parser)
    _mitigation_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dori", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, target: bool = True, export: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if target:
            _target_options(sub)
        _model_options(sub)
        # A trigger set's folder and a campaign's results folder are their own exports.
        _output_options(sub, export)
        return sub

    sub = command("replicate", "generate a prompt with several seeds; check each image for a training-image copy")
    sub.add_argument("--seeds", type=parse_seeds, default=[0, 1, 2, 3], help="e.g. 0-9 or 0,3,5 (default 0-3)")
    sub.add_argument("--threshold", type=float, help="similarity above which an image is a copy")
    _sampling_options(sub)
    _mitigation_options(sub)

    sub = command("localize", "find the neurons (NeMo) or weights (Wanda) behind a memorized prompt")
    sub.add_argument("--method", choices=sorted(LOCALIZERS), default="nemo")
    sub.add_argument("--seeds", type=parse_seeds, help="seeds of the localizer (default: the method's)")
    sub.add_argument("--evaluation-seeds", type=parse_seeds, default=[0, 1, 2, 3], help="before/after seeds")
    sub.add_argument("--param", type=parse_parameter, action="append", default=[], metavar="KEY=VALUE",
                     help="a parameter of the localizer, e.g. sparsity=0.05 or "
                          "reference_prompts='[\"a red car\", \"a dog\"]' (repeatable; JSON values)")
    sub.add_argument("--save-mask", type=Path, help="also write the mask as a safetensors file")

    sub = command("attack", "Dori: search text embeddings that make the model draw a training image again")
    sub.add_argument("--random-starts", type=int, default=1,
                     help="random starts, seeds S..S+N-1 with S = --start-seed (default 1)")
    sub.add_argument("--start-seed", type=int, default=0, help="seed of the first random start (default 0)")
    sub.add_argument("--prompt-start", action="store_true", help="also start from the prompt's own embedding")
    sub.add_argument("--search-steps", type=int, default=DoriSearch.steps)
    sub.add_argument("--lr", type=float, default=DoriSearch.lr)
    sub.add_argument("--batch-size", type=int, default=DoriSearch.batch_size,
                     help="(noise, timestep) pairs per start and step")
    sub.add_argument("--search-seed", type=int, default=DoriSearch.seed)
    sub.add_argument("--gradient-checkpointing", action="store_true",
                     help="recompute the UNet's activations in the backward pass: less memory, slower")
    sub.add_argument("--evaluation-seeds", type=parse_seeds, default=[0, 1, 2, 3])
    _sampling_options(sub)
    _mitigation_options(sub)

    sub = command("sweep", "replication of a prompt's embedding moved by random perturbations of growing size")
    sub.add_argument("--radii", type=parse_numbers, default=[0.0, 5.0, 10.0, 20.0], help="L2 distances, e.g. 0,5,10")
    sub.add_argument("--directions", type=int, default=4)
    sub.add_argument("--seeds", type=parse_seeds, default=[0, 1, 2, 3])
    sub.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    _sampling_options(sub)
    _mitigation_options(sub)

    sub = command("attribute", "which words of the prompt drive Wen et al.'s memorization score")
    sub.add_argument("--method", choices=sorted(ATTRIBUTIONS), default="gradient_norm")
    sub.add_argument("--param", type=parse_parameter, action="append", default=[], metavar="KEY=VALUE",
                     help="a parameter of the method, e.g. n_steps=64 (repeatable; JSON values)")

    sub = command("finetune", "adversarial fine-tuning: train memorized images away against Dori's triggers",
                  target=False)
    sub.add_argument("--targets", type=parse_seeds, default=[0], help="indices of memorized images, e.g. 0,2 (default 0)")
    sub.add_argument("--out-dir", type=Path, required=True, help="checkpoint and tuned model (OUT/model) go here")
    sub.add_argument("--resume", action="store_true", help="continue after the last finished round in --out-dir")
    sub.add_argument("--param", type=parse_parameter, action="append", default=[], metavar="KEY=VALUE",
                     help="a fine-tuning parameter, e.g. rounds=3 or dori={\"steps\": 20} (repeatable; JSON values)")

    sub = command("triggers", "build (or resume) a set of Dori triggers from random starts for one training image",
                  target=False, export=False)
    sub.add_argument("--image", type=int, required=True, help="index of the memorized training image")
    sub.add_argument("--folder", type=Path, required=True, help="where the set is kept (resumed if present)")
    sub.add_argument("--count", type=int, default=100)
    sub.add_argument("--starts-per-batch", type=int, default=10)
    sub.add_argument("--seed", type=int, default=0, help="trigger i starts from random seed SEED + i")
    sub.add_argument("--search-steps", type=int, default=DoriSearch.steps)
    sub.add_argument("--evaluation-seeds", type=parse_seeds, help="also generate each trigger with these seeds")

    sub = command("map", "a trigger set on a 2-D map beside prompts and random starts; the dispersion of each set",
                  target=False)
    _trigger_set_options(sub, count=False)
    sub.add_argument("--method", choices=METHODS, default="umap")
    sub.add_argument("--param", type=parse_parameter, action="append", default=[], metavar="KEY=VALUE",
                     help="a projection parameter, e.g. n_neighbors=10 or seed=1 (repeatable; JSON values)")

    sub = command("discrepancy", "activation discrepancy per layer: a trigger set's triggers vs the memorized captions",
                  target=False)
    _trigger_set_options(sub, count=True)
    sub.add_argument("--layers", choices=KINDS, default="value", help="value projections or feed-forward layers")
    sub.add_argument("--seed", type=int, default=0, help="seed of the first denoising step's noise")
    sub.add_argument("--steps", type=int, help="the schedule whose first timestep is used (default: the model's)")

    sub = command("agreement", "NeMo and Wanda fitted on each trigger of a trigger set; per-layer IoU of the masks",
                  target=False)
    _trigger_set_options(sub, count=True, default_count=3)
    sub.add_argument("--seeds", type=parse_seeds, help="seeds of both localizers (default: NeMo's)")
    sub.add_argument("--nemo-param", type=parse_parameter, action="append", default=[], metavar="KEY=VALUE",
                     help="a NeMo parameter, e.g. scales=3 (repeatable; JSON values)")
    sub.add_argument("--wanda-param", type=parse_parameter, action="append", default=[], metavar="KEY=VALUE",
                     help="a Wanda parameter, e.g. sparsity=0.02 (default layers: NeMo's)")

    sub = command("attention", "cross-attention maps of one seed: where each token (or trigger position) is looked at")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--layers", type=lambda text: text.split(","),
                     help="cross-attention layers by hook point, e.g. down.1.attn.0,mid.attn.0 (default: all)")
    sub.add_argument("--denoising-steps", type=parse_seeds, help="step indices summed, e.g. 0-4 (default: all)")
    sub.add_argument("--keep-step-maps", action="store_true", help="also keep every chosen step's maps")
    _inside_options(sub)

    sub = command("timeline", "x̂₀ at every denoising step of one seed and its similarity to the training image")
    sub.add_argument("--seed", type=int, default=0)
    _inside_options(sub)

    sub = command("detect", "Wen's noise gap, Ren et al.'s attention entropy and the bright ending, against the "
                            "model's reference prompts")
    sub.add_argument("--seeds", type=parse_seeds, default=[0, 1, 2, 3], help="e.g. 0-3 (default 0-3)")
    _inside_options(sub)

    sub = command("reference", "the detectors' distributions over the model's reference prompts (cached)",
                  target=False)
    _sampling_options(sub)

    sub = command("campaign", "run one analysis over a prompt list; one result file per item, resumable",
                  target=False, export=False)
    sub.add_argument("--prompts", default="bundled",
                     help="a CSV/JSON prompt list, 'bundled' (the model's memorized captions) or a shipped SD v1.4 list "
                          "('sd14-memorized', 'sd14-unmemorized')")
    sub.add_argument("--method", default="replicate", help="replicate, attack, localize or sweep (default replicate)")
    sub.add_argument("--out-dir", type=Path, required=True, help="one JSON per item is written here")
    sub.add_argument("--limit", type=int, help="only the first N items")
    sub.add_argument("--executor", choices=["local", "ray"], default="local")
    sub.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    sub.add_argument("--workers", type=int, help="CPUs of a local Ray (default: all)")
    sub.add_argument("--set", type=parse_parameter, action="append", default=[], metavar="KEY=VALUE",
                     help="a setting of the analysis, e.g. seeds=[0,1] (repeatable; JSON values)")

    sub = commands.add_parser("memorized", help="memorized sets: fetch SD v1.4's memorized LAION images",
                              description="memorized sets (imagefolder: images + metadata.csv)")
    actions = sub.add_subparsers(dest="action", required=True, metavar="ACTION")
    fetch = actions.add_parser(
        "fetch", help="download the images of a memorized-prompt list into an imagefolder set (resumable)",
        description="Download the images of SD v1.4's memorized LAION prompts (or a CSV of the same shape: "
                    "Caption, URL, type) into an imagefolder set for --memorized. Verbatim (VM) rows first; "
                    "a second run resumes; failed links are listed in FOLDER/dead_links.csv.")
    fetch.add_argument("--folder", type=Path, required=True, help="the set's folder (resumed if present)")
    fetch.add_argument("--prompts", type=Path, default=SD14_MEMORIZED_FILE, metavar="CSV",
                       help="the prompt list (default: the shipped memorized_laion_prompts.csv)")
    fetch.add_argument("--verbatim-only", action="store_true", help="only the verbatim (VM) rows")
    fetch.add_argument("--limit", type=int, help="at most the first N rows (verbatim ones first)")
    fetch.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per try (default %(default)s)")
    fetch.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                       help="tries after a timeout, connection or server error (default %(default)s)")
    fetch.add_argument("--max-mb", type=float, default=DEFAULT_MAX_BYTES / 2**20,
                       help="largest image accepted, in MB (default %(default)s)")
    _output_options(fetch, export=False)

    sub = commands.add_parser("rerun", help="run an exported ZIP again and compare its numbers",
                              description="run an exported ZIP again and compare its numbers")
    sub.add_argument("export_file", type=Path, metavar="EXPORT.zip")
    sub.add_argument("--model", default=None,
                     help="the folder or hub id to rerun on (needed unless the export was made on the bundled model: "
                          "an export never chooses what is loaded)")
    sub.add_argument("--out-dir", type=Path, default=None,
                     help="the folder a run that writes files (finetune) may write in; the export's out_dir must lie "
                          "inside it (a relative one is taken inside it)")
    sub.add_argument("--device", default="cpu")
    _data_options(sub.add_argument_group("data the export was run with (named again: a ZIP never chooses a path)"))
    _output_options(sub, export=True)
    return parser


# ---------------------------------------------------------------------------------------------------------------
# Commands


def _target_config(args) -> dict:
    return {key: value for key, value in (("image", getattr(args, "image", None)), ("prompt", getattr(args, "prompt", None)))
            if value is not None}


def _sampling_config(args) -> dict:
    return {key: value for key, value in (("steps", args.steps), ("guidance", args.guidance)) if value is not None}


def _mitigation(args) -> tuple[dict, dict[str, torch.Tensor]]:
    """The `mitigation` setting and the inputs it needs."""
    from analysis.masks import Mask

    if args.mitigation and args.mask:
        raise BadInput("give --mitigation or --mask, not both")
    if args.mask:
        if not args.mask.is_file():
            raise BadInput(f"no mask file at {args.mask}")
        return {"mitigation": {"method": "mask"}}, mask_tensors(Mask.load(args.mask))
    if args.mitigation:
        return {"mitigation": {"method": args.mitigation, "parameters": dict(args.param)}}, {}
    if args.param:
        raise BadInput("--param needs --mitigation")
    return {}, {}


def task_config(args) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(kind, config, inputs) of a task subcommand."""
    config = _target_config(args)
    inputs: dict[str, torch.Tensor] = {}
    if args.command == "replicate":
        config.update(seeds=args.seeds, **_sampling_config(args))
        if args.threshold is not None:
            config["threshold"] = args.threshold
        mitigation, inputs = _mitigation(args)
        config.update(mitigation)
    elif args.command == "localize":
        config.update(method=args.method, parameters=dict(args.param), evaluation_seeds=args.evaluation_seeds)
        if args.seeds is not None:
            config["seeds"] = args.seeds
    elif args.command == "attack":
        starts = [{"kind": "random", "seed": args.start_seed + i} for i in range(args.random_starts)]
        starts += [{"kind": "prompt"}] if args.prompt_start else []
        config.update(starts=starts, search=dict(lr=args.lr, steps=args.search_steps, batch_size=args.batch_size,
                                                 seed=args.search_seed,
                                                 gradient_checkpointing=args.gradient_checkpointing),
                      evaluation_seeds=args.evaluation_seeds, **_sampling_config(args))
        mitigation, inputs = _mitigation(args)
        config.update(mitigation)
    elif args.command == "sweep":
        config.update(radii=args.radii, directions=args.directions, seeds=args.seeds, seed=args.seed,
                      **_sampling_config(args))
        mitigation, inputs = _mitigation(args)
        config.update(mitigation)
    elif args.command == "attribute":
        config.update(method=args.method, parameters=dict(args.param))
    elif args.command == "finetune":
        config.update(targets=args.targets, out_dir=str(args.out_dir), parameters=dict(args.param), resume=args.resume)
    elif args.command == "map":
        config.update(method=args.method, parameters=dict(args.param))
    elif args.command == "discrepancy":
        config.update(layers=args.layers, seed=args.seed, **({} if args.steps is None else {"steps": args.steps}))
    elif args.command == "agreement":
        config.update(nemo=dict(args.nemo_param), wanda=dict(args.wanda_param),
                      **({} if args.seeds is None else {"seeds": args.seeds}))
    elif args.command in ("attention", "timeline", "detect"):
        config.update(_sampling_config(args), **({"seeds": args.seeds} if args.command == "detect" else
                                                 {"seed": args.seed}))
        if args.command == "attention":
            config.update(layers=args.layers, denoising_steps=args.denoising_steps,
                          keep_step_maps=args.keep_step_maps)
        mitigation, inputs = _mitigation(args)
        config.update(mitigation)
        inputs.update(_trigger_input(args))
    elif args.command == "reference":
        config.update(_sampling_config(args))
    return TRIGGER_SET_KINDS.get(args.command, args.command), config, inputs


def _trigger_input(args) -> dict[str, torch.Tensor]:
    """The `embedding` input of the Inside commands: trigger --trigger of the set in --folder."""
    from analysis.triggers import METADATA_FILE, TriggerSet

    if (args.folder is None) != (args.trigger is None):
        raise BadInput("give --folder and --trigger together (a trigger of a set), or neither (the prompt)")
    if args.folder is None:
        return {}
    if not (args.folder / METADATA_FILE).is_file():
        raise BadInput(f"no trigger set in {args.folder}: build one with `dori triggers`")
    embeddings = TriggerSet.load(args.folder).embeddings
    if not 0 <= args.trigger < len(embeddings):
        raise BadInput(f"--trigger {args.trigger} does not exist: the set has {len(embeddings)} triggers")
    return {"embedding": embeddings[args.trigger:args.trigger + 1]}


def trigger_set_settings(args, handle: ModelHandle) -> tuple[dict, dict[str, torch.Tensor]]:
    """The settings and inputs a trigger set gives its command: its image and triggers (and, to map, its starts)."""
    from analysis.trigger_map import map_settings
    from analysis.triggers import METADATA_FILE, TriggerSet

    if not (args.folder / METADATA_FILE).is_file():
        raise BadInput(f"no trigger set in {args.folder}: build one with `dori triggers`")
    config, inputs = map_settings(handle, TriggerSet.load(args.folder))
    if args.command == "map":
        return config, inputs
    if args.count is not None and args.count < 2:
        raise BadInput(f"--count must be at least 2, got {args.count}")
    return dict(image=config["image"]), {"triggers": inputs["triggers"][:args.count]}


def record_json(record: RunRecord) -> dict:
    """The JSON part of a record: what `--json` prints (images and tensors live in the ZIP export)."""
    return dict(kind=record.kind, model=record.model, config=record.config, metrics=record.metrics,
                table=record.table)


def _summary_lines(value: dict) -> list[str]:
    """Scalar metrics one a line; lists and objects shortened."""
    lines = []
    for key, item in value.items():
        text = json.dumps(item)
        lines.append(f"{key}: {text if len(text) <= 100 else text[:97] + '...'}")
    return lines


def _emit(args, payload: dict, summary: list[str]) -> None:
    text = json.dumps(payload, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text if args.json else "\n".join(summary))


def model_settings(args) -> dict:
    """The model options of a command, as `open_model` (and a campaign's configuration) takes them."""
    return dict(model=args.model, device=args.device, dtype=args.dtype,
                memorized=None if args.memorized is None else str(args.memorized),
                reference_prompts=None if args.reference_prompts is None else str(args.reference_prompts),
                sscd=None if args.sscd is None else str(args.sscd), sscd_threshold=args.sscd_threshold,
                normal=None if args.normal is None else str(args.normal))


def _load(args) -> ModelHandle:
    return open_model(**model_settings(args))


def cmd_task(args, progress: ProgressBars) -> int:
    kind, config, inputs = task_config(args)
    handle = _load(args)
    if args.command in TRIGGER_SET_KINDS:
        settings, inputs = trigger_set_settings(args, handle)
        config.update(settings)
    record = run_task(handle, kind, config, callback=progress, inputs=inputs)
    progress.close()
    if args.command == "localize" and args.save_mask:
        args.save_mask.parent.mkdir(parents=True, exist_ok=True)
        record_mask(record).save(args.save_mask)
    if args.export:
        save_export(record, args.export)
    _emit(args, record_json(record), [f"{kind} on {record.model}", *_summary_lines(record.metrics)])
    return 0


def cmd_rerun(args, progress: ProgressBars) -> int:
    recorded, reproduced = rerun(args.export_file, device=args.device, model=args.model, out_dir=args.out_dir,
                                 memorized=args.memorized, reference_prompts=args.reference_prompts, sscd=args.sscd,
                                 sscd_threshold=args.sscd_threshold, normal=args.normal)
    rows = compare_metrics(recorded.metrics, reproduced.metrics)
    if args.export:
        save_export(reproduced, args.export)
    reproduced_all = all(row["match"] for row in rows)
    lines = [f"rerun of {recorded.kind} on {recorded.model}: "
             f"{sum(row['match'] for row in rows)} of {len(rows)} numbers reproduced"]
    lines += [f"  {row['metric']}: recorded {row['recorded']}, now {row['reproduced']}" for row in rows if not row["match"]]
    _emit(args, dict(kind=recorded.kind, model=recorded.model, reproduced=reproduced_all, metrics=rows), lines)
    return 0 if reproduced_all else EXIT_FAILED


def cmd_triggers(args, progress: ProgressBars) -> int:
    from analysis.triggers import build_trigger_set

    handle = _load(args)
    if not 0 <= args.image < len(handle.memorized):
        raise BadInput(f"--image {args.image} does not exist: the model has {len(handle.memorized)} memorized images")
    if args.count < 1 or args.starts_per_batch < 1:
        raise BadInput(f"--count and --starts-per-batch must be at least 1, got {args.count}, {args.starts_per_batch}")

    def report(event) -> None:
        progress(TaskProgress("triggers", event.finished + event.step.index / event.step.total, event.total))

    trigger_set = build_trigger_set(handle, args.folder, handle.memorized[args.image], count=args.count,
                                    search=DoriSearch(steps=args.search_steps), starts_per_batch=args.starts_per_batch,
                                    seed=args.seed, evaluation_seeds=args.evaluation_seeds, callback=report)
    progress.close()
    rates = [t["replication_rate"] for t in trigger_set.triggers if t["replication_rate"] is not None]
    payload = dict(kind="triggers", model=handle.name, folder=str(args.folder), config=trigger_set.config,
                   count=len(trigger_set.triggers),
                   mean_replication_rate=sum(rates) / len(rates) if rates else None)
    _emit(args, payload, _summary_lines(payload))
    return 0


def cmd_campaign(args, progress: ProgressBars) -> int:
    from analysis.campaign import load_items, run_campaign

    items = load_items(args.prompts, model=args.model, memorized=args.memorized)
    if args.limit is not None:
        items = items[:args.limit]
    config = dict(args.set, **model_settings(args))
    summary = run_campaign(items, args.method, config, args.out_dir, executor=args.executor, address=args.address,
                           workers=args.workers, callback=progress)
    progress.close()
    _emit(args, summary, summary["table_markdown"].splitlines())
    return 0


def cmd_memorized(args, progress: ProgressBars) -> int:
    if args.limit is not None and args.limit < 1 or args.retries < 0 or args.timeout <= 0 or args.max_mb <= 0:
        raise BadInput("--limit, --timeout and --max-mb must be positive and --retries at least 0")
    report = fetch_memorized(args.prompts, args.folder, verbatim_only=args.verbatim_only, limit=args.limit,
                             timeout=args.timeout, retries=args.retries, max_bytes=int(args.max_mb * 2**20),
                             callback=lambda event: progress(TaskProgress("fetch", event.done, event.total,
                                                                          event.failure or "")))
    progress.close()
    payload = report.as_dict()
    _emit(args, payload, _summary_lines(payload))
    return 0


COMMANDS = {"rerun": cmd_rerun, "triggers": cmd_triggers, "campaign": cmd_campaign, "memorized": cmd_memorized}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = ProgressBars(enabled=not args.quiet)
    try:
        return COMMANDS.get(args.command, cmd_task)(args, progress)
    except (ValueError, FileNotFoundError, ModelLoadError) as err:
        progress.close()
        print(f"dori {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        progress.close()
        print(f"dori {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED

