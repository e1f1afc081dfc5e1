"""The `dori` command line (usage: `analysis.cli_parser`, or `dori --help`): each command turns its arguments
into a `run_task` configuration (or runs its own job: rerun, triggers, campaign, memorized) and prints the result.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from analysis.cli_parser import build_parser, parse_seeds
from analysis.dori import DoriSearch
from analysis.export import RunRecord, compare_metrics, save_export
from analysis.fetch import fetch_memorized
from analysis.model import ModelHandle, ModelLoadError, open_model
from analysis.progress import TaskProgress
from analysis.rerun import rerun
from analysis.task_settings import mask_tensors, record_mask
from analysis.tasks import run_task

__all__ = ["BadInput", "build_parser", "main", "parse_seeds", "task_config"]

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
# Commands that analyse a trigger set (`dori triggers`), and the kind of task each runs.
TRIGGER_SET_KINDS = {"map": "trigger_map", "discrepancy": "discrepancy", "agreement": "agreement"}


class BadInput(ValueError):
    """A command-line value that cannot be used; the message says which."""


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
        if kind == "FineTuneRound":  # a finished round: a line that stays, not a bar
            self.close()
            tqdm.write(f"round {event.round + 1}/{event.rounds} finished in {event.record['seconds']} s",
                       file=sys.stderr)
            return
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
                                 sscd_threshold=args.sscd_threshold, normal=args.normal, callback=progress)
    progress.close()
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
    report = fetch_memorized(args.prompts, args.folder, verbatim_only=args.verbatim_only, limit=args.limit,
                             timeout=args.timeout, retries=args.retries, max_bytes=int(args.max_mb * 2**20),
                             deadline=args.deadline,
                             callback=lambda event: progress(TaskProgress("fetch", event.done, event.total,
                                                                          event.failure or "")))
    progress.close()
    payload = report.as_dict()
    _emit(args, payload, _summary_lines(payload))
    return 0


COMMANDS = {"rerun": cmd_rerun, "triggers": cmd_triggers, "campaign": cmd_campaign, "memorized": cmd_memorized}


# Where a command writes: a file (--out, --export, --save-mask) or a folder it fills (--folder of `triggers` and
# `memorized fetch`, --out-dir of `finetune` and `campaign`).
OUTPUT_FILES = ("out", "export", "save_mask")
OUTPUT_FOLDERS = {"triggers": "folder", "memorized": "folder", "finetune": "out_dir", "campaign": "out_dir"}


def writable_folder(folder: Path, flag: str) -> None:
    """BadInput unless `folder` is (or can be made) a folder this process can write in: checked before a model
    loads, so that an unwritable place does not fail a run at its end."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise BadInput(f"{flag} {folder}: cannot write there ({err.strerror or type(err).__name__})") from None


def check_outputs(args) -> None:
    """BadInput for an output file that is a folder or lies under a file, and for an unwritable output folder."""
    for name in OUTPUT_FILES:
        path = getattr(args, name, None)
        flag = "--" + name.replace("_", "-")
        if path is not None and (path.is_dir() or any(parent.exists() and not parent.is_dir()
                                                      for parent in path.parents)):
            raise BadInput(f"{flag} {path}: give a file name (a folder, or a path under a file, cannot be written)")
    folder = OUTPUT_FOLDERS.get(args.command)
    if folder is not None:
        writable_folder(getattr(args, folder), "--" + folder.replace("_", "-"))


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0), or an argument error whose one line argparse printed (2)
        return stop.code if isinstance(stop.code, int) else EXIT_BAD_INPUT
    progress = ProgressBars(enabled=not args.quiet)
    if args.quiet:  # also the bars transformers and diffusers show while loading weights
        import diffusers
        import transformers

        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.disable_progress_bar()
    try:
        check_outputs(args)
        return COMMANDS.get(args.command, cmd_task)(args, progress)
    except (ValueError, FileNotFoundError, ModelLoadError) as err:
        progress.close()
        print(f"dori {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        progress.close()
        print(f"dori {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED

