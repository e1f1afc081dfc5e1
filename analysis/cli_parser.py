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
import math
from pathlib import Path

from analysis.dori import DoriSearch
from analysis.dori_tasks import AttackSettings, FinetuneSettings
from analysis.fetch import DEFAULT_DEADLINE_S, DEFAULT_MAX_BYTES, DEFAULT_RETRIES, DEFAULT_TIMEOUT_S
from analysis.hooks import KINDS
from analysis.inside_tasks import AttentionSettings, DetectSettings, TimelineSettings
from analysis.limits import (MAX_FETCH_BYTES, MAX_FETCH_RETRIES, MAX_FETCH_SECONDS, MAX_LOCALIZED_TRIGGERS, MAX_SEED,
                             MAX_SEEDS, MAX_STARTS)
from analysis.memorized import SD14_MEMORIZED_FILE
from analysis.metrics import SSCD_THRESHOLD
from analysis.projection import METHODS
from analysis.replication_tasks import AttributeSettings, LocalizeSettings, ReplicateSettings, SweepSettings
from analysis.settings import Sampling, Target, as_json, setting_of
from analysis.task_settings import ATTRIBUTIONS, LOCALIZERS
from analysis.trigger_set_tasks import AgreementSettings, DiscrepancySettings, TriggerMapSettings


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


class Bounded:
    """An argparse type: a whole number (`int`) or a finite number (`float`) within a setting's range (above `low`,
    not at it, when `above`)."""

    def __init__(self, kind: type, low: float | None, high: float | None, above: bool = False):
        self.kind, self.low, self.high, self.above = kind, low, high, above

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {self.kind.__name__}, got {text!r}") from None
        low_ok = self.low is None or (value > self.low if self.above else value >= self.low)
        if not math.isfinite(value) or not low_ok or (self.high is not None and value > self.high):
            if self.high is None:
                bound = f"above {self.low}" if self.above else f"of at least {self.low}"
            else:
                bound = f"above {self.low} and at most {self.high}" if self.above else f"from {self.low} to {self.high}"
            what = "a whole number" if self.kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {what} {bound}, got {text}")
        return value


class Parser(argparse.ArgumentParser):
    """argparse's parser, but an error is one line on stderr (the usage block is for --help) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class SeedList:
    """An argparse type: seeds as `parse_seeds` reads them, 1 to MAX_SEEDS of them, each from 0 to MAX_SEED."""

    low, high = 1, MAX_SEEDS

    def __call__(self, text: str) -> list[int]:
        seeds = parse_seeds(text)
        if len(seeds) > self.high or not all(0 <= seed <= MAX_SEED for seed in seeds):
            raise argparse.ArgumentTypeError(f"give {self.low} to {self.high} seeds from 0 to {MAX_SEED}, got {text!r}")
        return seeds


def seeds_text(seeds: list[int]) -> str:
    """[0, 1, 2, 3] -> '0-3' (what `parse_seeds` reads back)."""
    if len(seeds) > 1 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))


def add_setting(parser, flag: str, settings: type, name: str, **options) -> None:
    """The flag of setting `name` of a settings class: its default, help text and range come from the setting;
    `options` (argparse's) may give another type or help."""
    found = setting_of(settings, name)
    default = as_json(found.default)
    types = {"whole": Bounded(int, found.low, found.high), "real": Bounded(float, found.low, found.high),
             "seeds": SeedList()}
    if "action" not in options:
        options.setdefault("type", types.get(found.check))
    help_text = options.pop("help", found.help)
    if default is not None and not isinstance(default, bool):
        help_text += f" (default {seeds_text(default) if found.check == 'seeds' else default})"
    parser.add_argument(flag, default=default, help=help_text, **options)


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
    add_setting(group, "--image", Target, "image", type=int)
    add_setting(group, "--prompt", Target, "prompt")


def _sampling_options(parser: argparse.ArgumentParser) -> None:
    add_setting(parser, "--steps", Sampling, "steps")
    add_setting(parser, "--guidance", Sampling, "guidance")


def _mitigation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mitigation")
    group.add_argument("--mitigation", choices=sorted(LOCALIZERS), help="localize for the prompt and remove the units")
    group.add_argument("--mask", type=Path, help="a mask file (safetensors, e.g. from `dori localize --save-mask`)")
    group.add_argument("--param", type=parse_parameter, action="append", default=[], metavar="KEY=VALUE",
                       help="a parameter of the localizer or attribution method (repeatable; JSON values)")


def _trigger_set_options(parser: argparse.ArgumentParser, count: int | None = None,
                         default_count: int | None = None) -> None:
    """--folder, and with `count` (the most triggers the command takes) --count."""
    group = parser.add_argument_group("trigger set")
    group.add_argument("--folder", type=Path, required=True, help="a trigger set's folder (from `dori triggers`)")
    if count:
        group.add_argument("--count", type=Bounded(int, 2, count), default=default_count,
                           help=f"use the first N triggers, 2 to {count} (default: {default_count or 'all'})")


def _inside_options(parser: argparse.ArgumentParser) -> None:
    """A trigger of a set to analyse instead of the prompt, sampling options and a mitigation."""
    group = parser.add_argument_group("trigger (instead of the prompt)")
    group.add_argument("--folder", type=Path, help="a trigger set's folder (from `dori triggers`, or assets/triggers/...)")
    group.add_argument("--trigger", type=Bounded(int, 0, None), help="the index of the trigger in --folder")
    _sampling_options(parser)
    _mitigation_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dori", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    add_setting(sub, "--seeds", ReplicateSettings, "seeds")
    add_setting(sub, "--threshold", ReplicateSettings, "threshold")
    _sampling_options(sub)
    _mitigation_options(sub)

    sub = command("localize", "find the neurons (NeMo) or weights (Wanda) behind a memorized prompt")
    add_setting(sub, "--method", LocalizeSettings, "method", choices=sorted(LOCALIZERS))
    add_setting(sub, "--seeds", LocalizeSettings, "seeds", type=SeedList())
    add_setting(sub, "--evaluation-seeds", LocalizeSettings, "evaluation_seeds")
    sub.add_argument("--param", type=parse_parameter, action="append", default=[], metavar="KEY=VALUE",
                     help="a parameter of the localizer, e.g. sparsity=0.05 or "
                          "reference_prompts='[\"a red car\", \"a dog\"]' (repeatable; JSON values)")
    sub.add_argument("--save-mask", type=Path, help="also write the mask as a safetensors file")

    sub = command("attack", "Dori: search text embeddings that make the model draw a training image again")
    sub.add_argument("--random-starts", type=Bounded(int, 0, MAX_STARTS), default=1,
                     help="random starts, seeds S..S+N-1 with S = --start-seed (default 1)")
    sub.add_argument("--start-seed", type=Bounded(int, 0, MAX_SEED - MAX_STARTS), default=0,
                     help="seed of the first random start (default 0)")
    sub.add_argument("--prompt-start", action="store_true", help="also start from the prompt's own embedding")
    add_setting(sub, "--search-steps", DoriSearch, "steps")
    add_setting(sub, "--lr", DoriSearch, "lr")
    add_setting(sub, "--batch-size", DoriSearch, "batch_size")
    add_setting(sub, "--search-seed", DoriSearch, "seed")
    add_setting(sub, "--gradient-checkpointing", DoriSearch, "gradient_checkpointing", action="store_true")
    add_setting(sub, "--evaluation-seeds", AttackSettings, "evaluation_seeds")
    _sampling_options(sub)
    _mitigation_options(sub)

    sub = command("sweep", "replication of a prompt's embedding moved by random perturbations of growing size")
    add_setting(sub, "--radii", SweepSettings, "radii", type=parse_numbers)
    for name in ("directions", "seeds", "seed"):
        add_setting(sub, f"--{name}", SweepSettings, name)
    _sampling_options(sub)
    _mitigation_options(sub)

    sub = command("attribute", "which words of the prompt drive Wen et al.'s memorization score")
    add_setting(sub, "--method", AttributeSettings, "method", choices=sorted(ATTRIBUTIONS))
    sub.add_argument("--param", type=parse_parameter, action="append", default=[], metavar="KEY=VALUE",
                     help="a parameter of the method, e.g. n_steps=64 (repeatable; JSON values)")

    sub = command("finetune", "adversarial fine-tuning: train memorized images away against Dori's triggers",
                  target=False)
    add_setting(sub, "--targets", FinetuneSettings, "targets", type=parse_seeds)
    add_setting(sub, "--out-dir", FinetuneSettings, "out_dir", type=Path, required=True)
    add_setting(sub, "--resume", FinetuneSettings, "resume", action="store_true")
    sub.add_argument("--param", type=parse_parameter, action="append", default=[], metavar="KEY=VALUE",
                     help="a fine-tuning parameter, e.g. rounds=3 or dori={\"steps\": 20} (repeatable; JSON values)")

    sub = command("triggers", "build (or resume) a set of Dori triggers from random starts for one training image",
                  target=False, export=False)
    sub.add_argument("--image", type=Bounded(int, 0, None), required=True, help="index of the memorized training image")
    sub.add_argument("--folder", type=Path, required=True, help="where the set is kept (resumed if present)")
    sub.add_argument("--count", type=Bounded(int, 1, MAX_STARTS), default=100, help="triggers (default %(default)s)")
    sub.add_argument("--starts-per-batch", type=Bounded(int, 1, MAX_STARTS), default=10)
    sub.add_argument("--seed", type=Bounded(int, 0, MAX_SEED - MAX_STARTS), default=0,
                     help="trigger i starts from random seed SEED + i")
    add_setting(sub, "--search-steps", DoriSearch, "steps")
    sub.add_argument("--evaluation-seeds", type=SeedList(), help="also generate each trigger with these seeds")

    sub = command("map", "a trigger set on a 2-D map beside prompts and random starts; the dispersion of each set",
                  target=False)
    _trigger_set_options(sub)
    add_setting(sub, "--method", TriggerMapSettings, "method", choices=METHODS)
    sub.add_argument("--param", type=parse_parameter, action="append", default=[], metavar="KEY=VALUE",
                     help="a projection parameter, e.g. n_neighbors=10 or seed=1 (repeatable; JSON values)")

    sub = command("discrepancy", "activation discrepancy per layer: a trigger set's triggers vs the memorized captions",
                  target=False)
    _trigger_set_options(sub, count=MAX_STARTS)
    add_setting(sub, "--layers", DiscrepancySettings, "layers", choices=KINDS)
    add_setting(sub, "--seed", DiscrepancySettings, "seed")
    add_setting(sub, "--steps", DiscrepancySettings, "steps",
                help="the schedule whose first timestep is used (default: the model's)")

    sub = command("agreement", "NeMo and Wanda fitted on each trigger of a trigger set; per-layer IoU of the masks",
                  target=False)
    _trigger_set_options(sub, count=MAX_LOCALIZED_TRIGGERS, default_count=3)
    add_setting(sub, "--seeds", AgreementSettings, "seeds", type=SeedList())
    sub.add_argument("--nemo-param", type=parse_parameter, action="append", default=[], metavar="KEY=VALUE",
                     help="a NeMo parameter, e.g. scales=3 (repeatable; JSON values)")
    sub.add_argument("--wanda-param", type=parse_parameter, action="append", default=[], metavar="KEY=VALUE",
                     help="a Wanda parameter, e.g. sparsity=0.02 (default layers: NeMo's)")

    sub = command("attention", "cross-attention maps of one seed: where each token (or trigger position) is looked at")
    add_setting(sub, "--seed", AttentionSettings, "seed")
    add_setting(sub, "--layers", AttentionSettings, "layers", type=lambda text: text.split(","),
                help="cross-attention layers by hook point, e.g. down.1.attn.0,mid.attn.0 (default: all)")
    add_setting(sub, "--denoising-steps", AttentionSettings, "denoising_steps", type=parse_seeds,
                help="step indices summed, e.g. 0-4 (default: all)")
    add_setting(sub, "--keep-step-maps", AttentionSettings, "keep_step_maps", action="store_true")
    _inside_options(sub)

    sub = command("timeline", "x̂₀ at every denoising step of one seed and its similarity to the training image")
    add_setting(sub, "--seed", TimelineSettings, "seed")
    _inside_options(sub)

    sub = command("detect", "Wen's noise gap, Ren et al.'s attention entropy and the bright ending, against the "
                            "model's reference prompts")
    add_setting(sub, "--seeds", DetectSettings, "seeds")
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
    sub.add_argument("--limit", type=Bounded(int, 1, None), help="only the first N items")
    sub.add_argument("--executor", choices=["local", "ray"], default="local")
    sub.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    sub.add_argument("--workers", type=Bounded(int, 1, None), help="CPUs of a local Ray (default: all)")
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
    fetch.add_argument("--limit", type=Bounded(int, 1, None), help="at most the first N rows (verbatim ones first)")
    fetch.add_argument("--timeout", type=Bounded(float, 0, MAX_FETCH_SECONDS, above=True), default=DEFAULT_TIMEOUT_S,
                       help="seconds a read may wait (default %(default)s)")
    fetch.add_argument("--deadline", type=Bounded(float, 0, MAX_FETCH_SECONDS, above=True), default=DEFAULT_DEADLINE_S,
                       help="seconds one image may take, all tries together (default %(default)s)")
    fetch.add_argument("--retries", type=Bounded(int, 0, MAX_FETCH_RETRIES), default=DEFAULT_RETRIES,
                       help="tries after a timeout, connection or server error (default %(default)s)")
    fetch.add_argument("--max-mb", type=Bounded(float, 0, MAX_FETCH_BYTES / 2**20, above=True),
                       default=DEFAULT_MAX_BYTES / 2**20, help="largest image accepted, in MB (default %(default)s)")
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
