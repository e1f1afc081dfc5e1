"""Which mitigation holds under a Dori attack? No mitigation, NeMo, Wanda, Wen et al., adversarial fine-tuning.

    python -m analysis.experiments.robust_mitigation [--targets 0] [--seeds 8] [--rounds 2] [--rewrite]

On the bundled model, for the selected memorized images (default: the
astronaut, a choice that keeps the run within minutes on 2 shared CPU cores) each method yields one mitigated model for all of them:

* NeMo, Wanda: the union of the masks localized for each selected caption
  (reference prompts as in analysis.experiments.mitigation; statistics cached);
* Wen: the inference-time mitigation applied to every prompt given;
* adversarial fine-tuning: `AdversarialFineTuning` on the selected images,
  with the paper's normal term (L_DM) and, as variants, that term distilled
  from the unmodified UNet (at three learning rates), cross-attention-only
  training, triggers from the caption's embedding only, and a moving average
  of the weights; and the controls, the same fine-tuning without its trigger
  term.

For each: replication of each selected image under its caption and under a
fresh Dori attack (the caption's embedding and a Gaussian start; starts, search
noise and seeds used nowhere else); the similarity of held-out captions'
generations to the unmitigated ones (same seed; 1 = unchanged); the test
loss on renderings of the held-out captions; how often the held-out captions
are still drawn as captioned (colours read back from the pixels); the
replication of the non-selected memorized images; wall times. Against Wen the
attack is run on the plain model, since Wen leaves the weights alone: its
triggers are given to the model as embeddings (bypassing Wen), and separately
passed through Wen's mitigation as a deployment that also mitigates given
embeddings would. Then the fine-tuned model under a stronger attack than the
paper's (`--stress-starts` Gaussian starts beside the caption, `--stress-steps`
steps each). Writes docs/results/robust_mitigation.{md,json,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from analysis.attribution.common import memorization_objective
from analysis.demo.data import ProceduralShapes, split_shape_specs
from analysis.dori import DoriSearch, Start
from analysis.experiments.robust_mitigation_report import summarize, write_figure, write_markdown
from analysis.experiments.robust_mitigation_setup import (EMA_DECAY, WIDE_NORMAL_ROWS, Conditions, measure,
                                                          measure_wen, union)
from analysis.finetune import AdversarialFineTuning, attack, json_ready
from analysis.localize import DEFAULT_CACHE_DIR
from analysis.localize.nemo import NeMo
from analysis.localize.wanda import Wanda
from analysis.masks import generate
from analysis.metrics import replication
from analysis.model import ModelHandle, load_model
from analysis.paths import RUNS_DIR
from analysis.wen_mitigation import WenMitigation

RESULTS = Path("docs/results")
WORK = RUNS_DIR / "robust_mitigation"
STRESS_SEED = 3_000_000  # the stronger attack's starts and search noise, used nowhere else
MEASURED_FILE = "measured.pt"
STAGES = ("none", "nemo", "wanda", "wen", "finetune", "distilled", "distilled_slow", "distilled_mid",
          "distilled_wide", "attn2", "caption_triggers", "ema", "ema_long", "distilled_ema", "control", "control_ema",
          "stress")
# The first held-out captions, which analysis.experiments.mitigation keeps out of the localizers' reference prompts.
MITIGATION_HELD_OUT = 10


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, nargs="+", default=[0], help="indices of the memorized images")
    parser.add_argument("--seeds", type=int, default=8, help="generations per caption or trigger")
    parser.add_argument("--other-seeds", type=int, default=2, help="generations per non-selected memorized caption")
    parser.add_argument("--held-out", type=int, default=6, choices=range(1, MITIGATION_HELD_OUT + 1),
                        metavar=f"1..{MITIGATION_HELD_OUT}", help="held-out captions (seed 0 each)")
    parser.add_argument("--dori-steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2, help="adversarial fine-tuning rounds")
    parser.add_argument("--triggers", type=int, default=3, help="fine-tuning: triggers per image and round")
    parser.add_argument("--train-steps", type=int, default=30, help="fine-tuning: optimiser steps per round")
    parser.add_argument("--stress-starts", type=int, default=8, help="a stronger attack on the fine-tuned model: "
                        "Gaussian starts beside the caption's embedding (0: none)")
    parser.add_argument("--stress-steps", type=int, default=100, help="steps of the stronger attack's search")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=WORK, help="fine-tuning checkpoints and model (resumable)")
    parser.add_argument("--rewrite", action="store_true", help="only rewrite the report from the last measurement")
    parser.add_argument("--only", choices=STAGES, help="compute (and save in --work) only this method, e.g. to run "
                        "methods in parallel processes; a run without it reuses every saved stage")
    parser.add_argument("--saved-only", action="store_true", help="report only the stages already saved in --work")
    args = parser.parse_args(argv)
    handle = load_model()
    conditions = Conditions(handle, args.targets, args)
    if args.rewrite:
        write_outputs(args, handle, conditions)
        return
    # The reference prompts of analysis.experiments.mitigation, so that its cached localizer statistics are reused.
    reference_prompts = (handle.held_out_prompts[MITIGATION_HELD_OUT:]
                         + [s.caption for s in split_shape_specs()[0][::12]])

    def stage(name: str, compute) -> dict:
        """A stage's result from `args.work`, or computed and saved there (stages may run in parallel processes)."""
        path = args.work / f"stage-{name}.pt"
        if path.is_file():
            return torch.load(path, weights_only=False)
        print(name, flush=True)
        stage_started = time.time()
        result = dict(compute(), stage_seconds=round(time.time() - stage_started, 1))
        args.work.mkdir(parents=True, exist_ok=True)
        # Written whole under a name of this process, then renamed: parallel stages never see a partial file.
        partial = path.with_suffix(f".{os.getpid()}.partial")
        torch.save(result, partial)
        os.replace(partial, path)
        return result

    def baseline() -> dict:
        return dict(held_out=generate(handle, conditions.held_out, [0]),
                    others=[replication(generate(handle, [handle.memorized[i].caption], conditions.other_seeds),
                                        handle.memorized[i].image).rate for i in conditions.others])

    def masked(method: str, localize) -> dict:
        fit_started = time.time()
        mask = union([localize(handle.memorized[i].caption) for i in args.targets], method)
        seconds = round(time.time() - fit_started, 1)
        return dict(measure(handle, conditions, held_out_before, mask), fit_seconds=seconds,
                    removed=sum(mask.counts().values()))

    def wen() -> dict:
        # Wen's default target (the held-out captions' mean magnitude), computed once rather than in every fit.
        mitigation = WenMitigation(target=WenMitigation.held_out_target(
            handle, memorization_objective(handle, conditions.seeds)))
        return dict(measure_wen(handle, conditions, held_out_before, stage("none", none), mitigation),
                    fit_seconds=0.0, target=mitigation.target)

    finetuning = AdversarialFineTuning(rounds=args.rounds, triggers_per_image=args.triggers,
                                       steps_per_round=args.train_steps, dori=conditions.dori, eval_starts=0)
    # The ordinary pairs the results were measured with: fresh renderings of the training captions' shapes.
    shapes = ProceduralShapes()

    def finetune() -> dict:
        tuned = finetuning.fit(handle, args.targets, args.work / "finetune", callback=progress, normal=shapes)
        return dict(measure(load_model(tuned.model_dir), conditions, held_out_before), fit_seconds=tuned.seconds,
                    history=tuned.history, surrogate_sources=tuned.surrogate_sources, params=tuned.params,
                    surrogates=tuned.surrogates)

    def variant(name: str, **changes) -> Callable[[], dict]:
        """The fine-tuning with other settings, e.g. without its trigger term (the control)."""
        def compute() -> dict:
            tuned = dataclasses.replace(finetuning, **changes).fit(handle, args.targets, args.work / name,
                                                                   callback=progress, normal=shapes)
            return dict(measure(load_model(tuned.model_dir), conditions, held_out_before), fit_seconds=tuned.seconds)
        return compute

    def none() -> dict:
        return dict(measure(handle, conditions, held_out_before), fit_seconds=0.0)

    def stress() -> dict:
        """The fine-tuned model under a stronger attack than the paper's: more starts, more steps."""
        stage("finetune", finetune)
        tuned = load_model(args.work / "finetune" / "model")
        rows = []
        for j, index in enumerate(args.targets):
            seed = STRESS_SEED + 1000 * j
            item = tuned.memorized[index]
            starts = [Start.prompt(item.caption)] + [Start.random(seed + i) for i in range(args.stress_starts)]
            rows.append(json_ready(attack(tuned, item, DoriSearch(steps=args.stress_steps, seed=seed), starts,
                                          conditions.seeds)))
            print(f"  {item.caption[:40]}: stronger Dori {rows[-1]['dori_replication']:.2f}", flush=True)
        return dict(targets=rows, starts=1 + args.stress_starts, steps=args.stress_steps)

    stages = dict(
        none=none,
        nemo=lambda: masked("nemo", lambda caption: NeMo(reference_prompts=reference_prompts,
                                                         cache_dir=DEFAULT_CACHE_DIR).fit(handle, caption,
                                                                                          seeds=range(4)).mask_),
        wanda=lambda: masked("wanda", lambda caption: Wanda(reference_prompts=reference_prompts,
                                                           cache_dir=DEFAULT_CACHE_DIR).fit(handle, caption).mask_),
        wen=wen,
        finetune=finetune,
        distilled=variant("distilled", utility_loss="distillation"),
        distilled_slow=variant("distilled_slow", utility_loss="distillation", lr=3e-5),
        distilled_mid=variant("distilled_mid", utility_loss="distillation", lr=5e-5),
        distilled_wide=variant("distilled_wide", utility_loss="distillation",
                               normal_batch=WIDE_NORMAL_ROWS * finetuning.normal_batch),
        attn2=variant("attn2", trainable="attn2"),
        caption_triggers=variant("caption_triggers", triggers_per_image=1),
        ema=variant("ema", ema_decay=EMA_DECAY),
        ema_long=variant("ema_long", ema_decay=EMA_DECAY, rounds=2 * args.rounds),
        distilled_ema=variant("distilled_ema", utility_loss="distillation", ema_decay=EMA_DECAY),
        control=variant("control", adversarial_batch=0),
        control_ema=variant("control_ema", adversarial_batch=0, ema_decay=EMA_DECAY),
    )
    before = stage("baseline", baseline)
    held_out_before, others_before = before["held_out"], before["others"]
    if args.only:
        stage(args.only, {**stages, "stress": stress}[args.only])
        return
    if args.saved_only:
        results = {name: torch.load(args.work / f"stage-{name}.pt", weights_only=False) for name in stages
                   if (args.work / f"stage-{name}.pt").is_file()}
        stressed = (torch.load(args.work / "stage-stress.pt", weights_only=False)
                    if (args.work / "stage-stress.pt").is_file() else None)
    else:
        results = {name: stage(name, compute) for name, compute in stages.items()}
        stressed = stage("stress", stress) if args.stress_starts else None
    surrogates = results["finetune"].pop("surrogates") if "finetune" in results else None
    seconds = (before["stage_seconds"] + sum(result["stage_seconds"] for result in results.values())
               + (stressed["stage_seconds"] if stressed else 0))
    for result in results.values():
        for j, row in enumerate(result["targets"]):
            # Per attack start (the caption's embedding, then the Gaussian start): where the image is still found.
            row["dori_by_start"] = [replication(images, handle.memorized[args.targets[j]].image).rate
                                    for images in row["dori_images"]]
    summary = summarize(results, others_before, args, seconds)
    document = dict(summary=summary, settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    others_before=others_before,
                    other_captions=[handle.memorized[i].caption for i in conditions.others],
                    held_out_prompts=conditions.held_out, reference_prompts=reference_prompts,
                    methods={name: strip(result) for name, result in results.items()}, stress=stressed)
    # Everything measured, so that the report can be rewritten (--rewrite) without measuring again.
    torch.save(dict(document=document, results=results, held_out_before=held_out_before, surrogates=surrogates),
               args.work / MEASURED_FILE)
    write_outputs(args, handle, conditions)


def write_outputs(args, handle: ModelHandle, conditions: Conditions) -> None:
    measured = torch.load(args.work / MEASURED_FILE, weights_only=False)
    document = measured["document"]
    args.out.mkdir(parents=True, exist_ok=True)
    write_figure(args.out / "robust_mitigation.png", handle, conditions, measured["held_out_before"],
                 measured["results"], measured["surrogates"])
    (args.out / "robust_mitigation.json").write_text(json.dumps(document, indent=1))
    write_markdown(args.out / "robust_mitigation.md", document, argparse.Namespace(**document["settings"]))
    print(json.dumps(document["summary"], indent=1))


def progress(event) -> None:
    if event.step + 1 == event.total and event.stage != "evaluate":
        print(f"  round {event.round + 1}/{event.rounds} {event.stage} done"
              + (f", loss {event.loss:.4f}" if event.loss is not None else ""), flush=True)


def strip(result: dict) -> dict:
    """A method's result without tensors."""
    return {key: [json_ready(row) for row in value] if key == "targets" else value
            for key, value in result.items() if not isinstance(value, torch.Tensor)}



if __name__ == "__main__":
    main()
