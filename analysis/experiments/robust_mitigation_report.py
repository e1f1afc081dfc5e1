"""The robust-mitigation experiment's summary, verdicts, report and figure (docs/results/robust_mitigation.*)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from analysis.demo.data import split_shape_specs
from analysis.experiments.robust_mitigation_setup import (EMA_DECAY, FIDELITY_SEEDS, HELD_OUT_RENDERINGS,
                                                          WIDE_NORMAL_ROWS, Conditions, mean)
from analysis.finetune import AdversarialFineTuning
from analysis.images import image_grid
from analysis.metrics import REPLICATION_THRESHOLD
from analysis.model import ModelHandle

SHOWN = 3  # generations per condition in the figure
# "Unaffected": held-out generations this similar to the unmitigated ones, and non-selected images losing at most
# this much replication.
HELD_OUT_UNAFFECTED = 0.9
KEPT_SIMILARITY = 0.85  # "close to unaffected" in the trade-off between unlearning and held-out drift
OTHERS_UNAFFECTED = 0.1
FIDELITY_UNAFFECTED = 0.05  # the most the caption fidelity of held-out captions may drop
TARGET_DORI_REPLICATION = 0.2

METHOD_NAMES = dict(none="no mitigation", nemo="NeMo", wanda="Wanda", wen="Wen et al.",
                    finetune="adversarial fine-tuning", distilled="adversarial fine-tuning, distilled normal term",
                    distilled_slow="adversarial fine-tuning, distilled normal term, lr 3e-5",
                    distilled_mid="adversarial fine-tuning, distilled normal term, lr 5e-5",
                    distilled_wide=f"adversarial fine-tuning, distilled normal term, {WIDE_NORMAL_ROWS}× its rows",
                    attn2="adversarial fine-tuning, cross-attention only",
                    caption_triggers="adversarial fine-tuning, triggers from the caption only",
                    ema=f"adversarial fine-tuning, moving average {EMA_DECAY}",
                    ema_long=f"adversarial fine-tuning, moving average {EMA_DECAY}, twice the rounds",
                    distilled_ema=f"adversarial fine-tuning, distilled normal term, moving average {EMA_DECAY}",
                    control="fine-tuning without triggers (control)",
                    control_ema=f"fine-tuning without triggers (control), moving average {EMA_DECAY}")


# Fine-tuning with other settings, judged against the same targets.
VARIANTS = ("distilled", "distilled_slow", "distilled_mid", "distilled_wide", "attn2", "caption_triggers", "ema",
            "ema_long", "distilled_ema")


def summarize(results: dict, others_before: list[float], args, seconds: float) -> dict:
    summary = dict(seeds=args.seeds, other_seeds=args.other_seeds, dori_steps=args.dori_steps, rounds=args.rounds,
                   threshold=REPLICATION_THRESHOLD, wall_time_s=round(seconds, 1),
                   others_replication_before=mean(others_before), measured=list(results))
    for name, result in results.items():
        summary[name] = dict(
            prompt_replication=mean(row["prompt_replication"] for row in result["targets"]),
            dori_replication=mean(row["dori_replication"] for row in result["targets"]),
            dori_by_start=[mean(rates) for rates in zip(*(row["dori_by_start"] for row in result["targets"]))],
            held_out_similarity=result["held_out_similarity"],
            # Wen changes no weights but every prompt's embedding at generation: no test loss of its own.
            held_out_loss=result.get("held_out_loss"),
            held_out_fidelity=result["held_out_fidelity"],
            others_replication=mean(result["others_replication"]),
            fit_seconds=result["fit_seconds"], attack_seconds=result["attack_seconds"])
    if "wen" in results:
        summary["wen"]["dori_through_wen_replication"] = mean(row["dori_through_wen_replication"]
                                                              for row in results["wen"]["targets"])
    if "finetune" in results:
        tuned = summary["finetune"]
        summary["target"] = dict(
            dori_replication_at_most=TARGET_DORI_REPLICATION, held_out_similarity_at_least=HELD_OUT_UNAFFECTED,
            others_drop_at_most=OTHERS_UNAFFECTED,
            dori_met=tuned["dori_replication"] <= TARGET_DORI_REPLICATION,
            held_out_met=same_pictures(tuned), fidelity_drop_at_most=FIDELITY_UNAFFECTED,
            fidelity_met=as_captioned(tuned, summary),
            others_met=summary["others_replication_before"] - tuned["others_replication"] <= OTHERS_UNAFFECTED)
    return summary


def write_figure(path: Path, handle: ModelHandle, conditions: Conditions, held_out_before: torch.Tensor,
                 results: dict, surrogates: dict[str, torch.Tensor] | None) -> None:
    rows = []
    for j, index in enumerate(conditions.targets):
        item = handle.memorized[index]
        if surrogates is not None:
            rows.append(torch.cat([item.image[None], surrogates[item.caption][:SHOWN]]))
        for result in results.values():
            row = result["targets"][j]
            rows.append(torch.cat([item.image[None], row["prompt_images"][:SHOWN],
                                   row["dori_images"][:, :SHOWN].flatten(0, 1)]))
    rows.append(held_out_before)
    if "finetune" in results:
        rows.append(results["finetune"]["held_out_images"])
    image_grid(rows, scale=3).save(path)


def unlearned(s: dict) -> bool:
    return s["dori_replication"] <= TARGET_DORI_REPLICATION


def same_pictures(s: dict) -> bool:
    return s["held_out_similarity"] >= HELD_OUT_UNAFFECTED


def as_captioned(s: dict, summary: dict) -> bool:
    return summary["none"]["held_out_fidelity"] - s["held_out_fidelity"] <= FIDELITY_UNAFFECTED


def verdict(s: dict, summary: dict) -> str:
    """A fine-tuning setting against the paper's target: the image unlearned, held-out captions unaffected."""
    if not unlearned(s):
        return "a fresh attack still finds the image."
    if same_pictures(s) and as_captioned(s, summary):
        return "meets every target."
    if as_captioned(s, summary):
        return "unlearns the image and keeps held-out captions drawn as captioned, but not as the same pictures."
    return "unlearns the image, but held-out captions are drawn less faithfully."


def outcome(s: dict, summary: dict) -> str:
    return (f"Dori {s['dori_replication']:.2f}, held-out similarity {s['held_out_similarity']:.3f}, test loss "
            f"{loss_cell(s['held_out_loss'], summary)}, as captioned {s['held_out_fidelity']:.2f}")


def closer_with_more_rows(wide: dict, distilled: dict) -> str:
    """Did more rows of the distilled normal term keep held-out captions closer, by either utility measure?"""
    closer = [measure for measure, key in (("same-seed similarity", "held_out_similarity"),
                                           ("as captioned", "held_out_fidelity")) if wide[key] > distilled[key]]
    if not closer:
        return "More rows of the normal term did not hold the held-out captions closer."
    if len(closer) == 2:
        return "More rows of the normal term held the held-out captions closer."
    return f"More rows of the normal term held the held-out captions closer by {closer[0]} only."


def variant_lines(summary: dict) -> list[str]:
    """What the variants and the controls say about where the held-out drift comes from."""
    if not all(name in summary for name in ("control", "control_ema", *VARIANTS)):
        return []
    tuned, control, control_ema, distilled, slow, mid, wide, attn2, caption_only, ema, ema_long, distilled_ema = (
        summary[name] for name in ("finetune", "control", "control_ema", "distilled", "distilled_slow",
                                   "distilled_mid", "distilled_wide", "attn2", "caption_triggers", "ema", "ema_long",
                                   "distilled_ema"))

    def loss(s: dict) -> str:
        return loss_cell(s["held_out_loss"], summary)

    def result(s: dict) -> str:
        return outcome(s, summary)

    def starts(s: dict) -> str:
        return ", ".join(f"{rate:.2f}" for rate in s["dori_by_start"])

    settings = ("finetune", *VARIANTS)
    unlearning = [name for name in settings if unlearned(summary[name])]
    kept = [name for name in settings if summary[name]["held_out_similarity"] >= KEPT_SIMILARITY]
    every = [name for name in unlearning if same_pictures(summary[name]) and as_captioned(summary[name], summary)]
    captioned = [name for name in unlearning if as_captioned(summary[name], summary)]
    trade_off = []
    if unlearning:
        best = max(unlearning, key=lambda name: summary[name]["held_out_similarity"])
        trade_off.append(f"of the settings that bring Dori to ≤ {TARGET_DORI_REPLICATION}, the one that keeps "
                         f"held-out captions closest is {METHOD_NAMES[best]} (similarity "
                         f"{summary[best]['held_out_similarity']:.3f})")
    if kept:
        best = min(kept, key=lambda name: summary[name]["dori_replication"])
        trade_off.append(f"of those that keep held-out similarity ≥ {KEPT_SIMILARITY}, the one that unlearns most is "
                         f"{METHOD_NAMES[best]} (Dori {summary[best]['dori_replication']:.2f})")
    fidelities = f"{control['held_out_fidelity']:.2f}; unmitigated {summary['none']['held_out_fidelity']:.2f}"
    if not as_captioned(control, summary):
        control_fidelity = f"The control also draws held-out captions as captioned less often ({fidelities})."
    elif as_captioned(tuned, summary):
        control_fidelity = f"Held-out captions stay drawn as captioned under the control ({fidelities})."
    else:
        control_fidelity = (f"Held-out captions stay drawn as captioned under the control ({fidelities}): its drift "
                            "moves pixels, not what is drawn. What costs that is the trigger term (adversarial "
                            f"fine-tuning: {tuned['held_out_fidelity']:.2f}).")
    return ["", "## Where the held-out drift comes from", "",
            f"- Fine-tuning on the normal pairs alone (the control) already raises the test loss on held-out "
            f"captions to {loss(control)} and lowers held-out similarity to {control['held_out_similarity']:.3f}. "
            f"The same control shipping a moving average of its weights (decay {EMA_DECAY}), as the bundled "
            f"model's own training ships its EMA, keeps them at {loss(control_ema)} and "
            f"{control_ema['held_out_similarity']:.3f}: most of the control's drift is the noise of single Adam steps "
            "at a constant lr on small batches, which the average removes. " + control_fidelity,
            f"- With the trigger term and the moving average: {result(ema)}; with twice the rounds: "
            f"{result(ema_long)}; with the distilled normal term too: {result(distilled_ema)}. The average keeps the "
            "test loss near the pruning methods', but it also averages away much of the unlearning: a fresh attack "
            "finds the image.",
            f"- Distilling the normal term from the unmodified UNet instead of L_DM (raw weights): {result(distilled)} "
            f"(paper's term: {result(tuned)}). At lr 5e-5: {result(mid)}; at lr 3e-5: {result(slow)}. With "
            f"{WIDE_NORMAL_ROWS * AdversarialFineTuning.normal_batch} distilled normal rows a step instead of "
            f"{AdversarialFineTuning.normal_batch} (the captions held harder, the trigger term unchanged): "
            f"{result(wide)}. " + closer_with_more_rows(wide, distilled),
            f"- Training cross-attention only: {result(attn2)}. Unlearning in the text's paths alone leaves the image "
            "in the rest of the UNet, for new triggers to find (the paper: LoRA did not work).",
            f"- Triggers from the caption's embedding only (one Dori start a round instead of the caption and "
            f"Gaussian starts): {result(caption_only)}. By attack start (caption's embedding, Gaussian): "
            f"{starts(caption_only)}, against {starts(tuned)} with Gaussian-start triggers in training. "
            + ("Unlearning where searches from the caption end leaves the image for a search from elsewhere: the "
               "triggers to train away are as scattered as the paper finds them."
               if caption_only["dori_by_start"][-1] > tuned["dori_by_start"][-1] else
               "Training on the caption's triggers alone does no worse against the Gaussian start here."),
            f"- The trade-off over all {len(settings)} fine-tuning settings: " + "; ".join(trade_off or ["none "
            "unlearns the image or keeps the held-out captions"]) + ". " + (
                f"{', '.join(METHOD_NAMES[name] for name in every)} meet(s) every target." if every else
                f"Judged as the paper judges utility, by whether a held-out caption still gets what it says: "
                f"{', '.join(METHOD_NAMES[name] for name in captioned)} unlearn(s) the image and keep(s) held-out "
                f"captions drawn as captioned (unmitigated {summary['none']['held_out_fidelity']:.2f}), though not as "
                f"the same pictures (similarity < {HELD_OUT_UNAFFECTED})." if captioned else
                "No setting unlearns the image and keeps held-out captions drawn as captioned: on this model, what "
                "makes a fresh attack fail also changes what held-out captions draw; the unlearning is no more "
                "local than the memorization.")]


def stress_lines(stress: dict | None, summary: dict) -> list[str]:
    """The stronger attack on the fine-tuned model, beside the paper's."""
    if not stress:
        return []
    rate = mean(row["dori_replication"] for row in stress["targets"])
    losses = ", ".join(f"{loss:.4f}" for row in stress["targets"] for loss in row["dori_loss"])
    return ["", "## A stronger attack on the fine-tuned model", "",
            f"The paper's attack is one {summary['dori_steps']}-step search per start. Here {stress['starts']} starts "
            f"(the caption's embedding and {stress['starts'] - 1} Gaussian starts, seeds used nowhere else) search "
            f"{stress['steps']} steps each against the fine-tuned model: replication **{rate:.2f}** (paper's attack: "
            f"{summary['finetune']['dori_replication']:.2f}); final losses {losses}. " +
            ("Adversarial fine-tuning at this budget raises the cost of an attack; it does not remove the image."
             if rate > TARGET_DORI_REPLICATION else
             "The fine-tuned model withstands the stronger attack too.")]


def loss_cell(loss: float | None, summary: dict) -> str:
    """A held-out test loss and its change against no mitigation."""
    if loss is None:
        return "—"
    plain = summary.get("none", {}).get("held_out_loss")
    return f"{loss:.4f}" + (f" ({loss / plain - 1:+.1%})" if plain else "")


def write_markdown(path: Path, document: dict, args) -> None:
    summary, methods = document["summary"], document["methods"]

    def yes(flag: bool) -> str:
        return "yes" if flag else "**no**"

    missing = [label for name, label in METHOD_NAMES.items() if name not in methods]
    lines = [
        "# Robust mitigation: which mitigation holds under a Dori attack",
        "",
        f"Written by `python -m analysis.experiments.robust_mitigation --targets {' '.join(map(str, args.targets))} "
        f"--seeds {args.seeds} --rounds {args.rounds} --triggers {args.triggers} --train-steps {args.train_steps} "
        f"--stress-starts {args.stress_starts} --stress-steps {args.stress_steps}` "
        f"({summary['wall_time_s']} s of stage wall time on this machine, 2 CPU cores shared with other jobs; "
        "stages may run in parallel processes, so fit and attack times compare only roughly). "
        "Each method gives one mitigated model for all selected images. Replication: share "
        f"of {args.seeds} generations (seeds never used in any fit) whose pixel correlation with the training photo "
        f"exceeds {summary['threshold']}. Dori: a fresh {args.dori_steps}-step search from the caption's embedding "
        "and from a Gaussian start, each trigger generated with every seed. Held-out: mean pixel correlation of "
        f"{len(document['held_out_prompts'])} held-out captions' generations (seed 0) with the unmitigated ones "
        "(1 = unchanged). Held-out loss: the model's test loss, mean L_DM over "
        f"{HELD_OUT_RENDERINGS} fixed renderings of each of the {len(split_shape_specs()[1])} held-out captions with "
        "fixed noise and steps, and its change against no mitigation. Held-out as captioned: share of generations "
        f"of the {len(split_shape_specs()[1])} held-out captions ({len(FIDELITY_SEEDS)} seeds each) whose background "
        "and shape colour, read from the pixels, are the caption's: whether the model still draws what a caption "
        "says, as the paper's CLIP-score utility check asks, rather than the same picture. "
        f"Non-selected: mean replication of the other {len(document['other_captions'])} memorized "
        f"photos over {args.other_seeds} seeds (unmitigated: {summary['others_replication_before']:.2f}).",
        "",
        *([f"**Not measured** (the run was stopped before these stages finished): {', '.join(missing)}.", ""]
          if missing else []),
        "| method | caption: replicated | Dori: replicated | held-out similarity | held-out loss "
        "| held-out as captioned | non-selected replicated | fit s | attack s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, label in METHOD_NAMES.items():
        if name in methods:
            s = summary[name]
            lines.append(f"| {label} | {s['prompt_replication']:.2f} | **{s['dori_replication']:.2f}** | "
                         f"{s['held_out_similarity']:.3f} | {loss_cell(s['held_out_loss'], summary)} | "
                         f"{s['held_out_fidelity']:.2f} | {s['others_replication']:.2f} | {s['fit_seconds']} | {s['attack_seconds']} |")
    if "wen" in methods:
        lines += [
            "",
            f"Wen et al.: AdamW lr 0.05, at most 10 iterations, stop at m ≤ {methods['wen']['target']:.3f} (the mean "
            "first-step magnitude of the held-out captions); every prompt given is mitigated, the non-selected and "
            "held-out captions too. It changes no weights, so it has no test loss of its own (—). Against Wen the triggers are given as embeddings, which bypasses the mitigation "
            "(it only rewrites the embedding of what it is given; the weights are the plain model's). Passed through "
            f"Wen's mitigation as well, they replicate at **{summary['wen']['dori_through_wen_replication']:.2f}**.",
        ]
    lines += [
        "",
        "## Per image",
        "",
        "| method | image | caption: replicated (similarity) | Dori: replicated (similarity) "
        "| Dori by start: caption's embedding, Gaussian |",
        "|---|---|---|---|---|",
        *[f"| {label} | {row['caption']} | {row['prompt_replication']:.2f} ({row['prompt_similarity']:.2f}) | "
          f"{row['dori_replication']:.2f} ({row['dori_similarity']:.2f}) | "
          f"{', '.join(f'{rate:.2f}' for rate in row['dori_by_start'])} |"
          for name, label in METHOD_NAMES.items() if name in methods for row in methods[name]["targets"]],
        "",
    ]
    if "finetune" in methods:
        lines += finetune_lines(summary, methods, document.get("stress"), yes)
    shown = ", ".join(label for name, label in METHOD_NAMES.items() if name in methods)
    lines += [
        "## Figure",
        "",
        (f"Per selected image: the photo and {SHOWN} surrogate images; then " if "finetune" in methods
         else "Per selected image: ")
        + f"one row per method ({shown}): the photo, {SHOWN} generations of the caption, {SHOWN} generations of each "
        "of the 2 Dori triggers (for Wen: the triggers as given). Last rows: held-out captions (seed 0) on the plain "
        + ("and on the fine-tuned model." if "finetune" in methods else "model."),
        "",
        "![grid](robust_mitigation.png)",
        "",
    ]
    path.write_text("\n".join(lines))


def finetune_lines(summary: dict, methods: dict, stress: dict | None, yes) -> list[str]:
    target, tuned = summary["target"], methods["finetune"]
    others = ", ".join(f"{name} {summary[name]['dori_replication']:.2f}" for name in ("none", "nemo", "wanda")
                       if name in summary)
    return [
        "## Target (paper: after adversarial fine-tuning Dori replication ≤ 0.2, held-out and non-selected unaffected)",
        "",
        f"- Dori replication after fine-tuning ≤ {target['dori_replication_at_most']}: {yes(target['dori_met'])} "
        f"({summary['finetune']['dori_replication']:.2f}; {others}).",
        f"- Held-out similarity ≥ {target['held_out_similarity_at_least']}: {yes(target['held_out_met'])} "
        f"({summary['finetune']['held_out_similarity']:.3f}"
        + (f"; the control, the same fine-tuning without its trigger term: "
           f"{summary['control']['held_out_similarity']:.3f}" if "control" in summary else "") + ").",
        f"- Share of held-out generations drawn as captioned drops by ≤ {target['fidelity_drop_at_most']}: "
        f"{yes(target['fidelity_met'])} ({summary['none']['held_out_fidelity']:.2f} → "
        f"{summary['finetune']['held_out_fidelity']:.2f}"
        + (f"; the controls, which unlearn nothing: {summary['control']['held_out_fidelity']:.2f}, "
           f"{summary['control_ema']['held_out_fidelity']:.2f}" if "control_ema" in summary else "") + ").",
        f"- Non-selected replication drops by ≤ {target['others_drop_at_most']}: {yes(target['others_met'])} "
        f"({summary['others_replication_before']:.2f} → {summary['finetune']['others_replication']:.2f}).",
        *[f"- {METHOD_NAMES[name]}: {outcome(summary[name], summary)}: {verdict(summary[name], summary)}"
          for name in ("finetune", *VARIANTS) if name in summary],
        "",
        "Final Dori loss per attack start (caption, Gaussian), which a search has to push down to reach a replica: "
        + "; ".join(f"{name} {', '.join(f'{loss:.4f}' for loss in methods[name]['targets'][0]['dori_loss'])}"
                    for name in ("none", "finetune") if name in methods)
        + (". Fine-tuning against each round's fresh triggers raised the loss where a new search ends, and its "
           f"{summary['dori_steps']} steps no longer reach a replica." if target["dori_met"] else
           ". Fine-tuning toward the surrogate unlearns the caption and the collected triggers, but the image "
           "stays reachable from fresh starts: the weights still hold it at this budget (rounds × triggers × "
           "steps above), far below the paper's 5 epochs over many triggers.")
        + " The held-out similarity is pixel correlation with the same seed; drawn as captioned asks only whether "
        "the colours a caption names are drawn. "
        + ("The fine-tuned model draws what held-out captions say as often as before, in other pictures."
           if target["fidelity_met"] else "The fine-tuned model draws what held-out captions say less often, not "
           "only other pictures of it (figure, last two rows)."),
        *variant_lines(summary),
        *stress_lines(stress, summary),
        "",
        "## Adversarial fine-tuning",
        "",
        f"Settings: `{json.dumps(tuned['params'])}`. The {len(tuned['history'])} rounds took {tuned['fit_seconds']} s "
        "(the fit time above; the surrogates' generation is not included). Surrogates: "
        + "; ".join(f"{caption}: {source}" for caption, source in tuned["surrogate_sources"].items()) + ".",
        "",
        "| round | normal loss (mean) | trigger loss (mean) | seconds |",
        "|---|---|---|---|",
        *[f"| {r['round'] + 1} | {mean(r['normal_loss']):.4f} | {mean(r['adversarial_loss']):.4f} | {r['seconds']} |"
          for r in tuned["history"]],
        "",
    ]

