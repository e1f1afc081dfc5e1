"""The Fine-tune view: adversarial fine-tuning against Dori's triggers, then this session can switch to the result.

The run goes through `analysis.tasks.run_task("finetune", ...)`: the same
configuration the command line runs. Its folder is named after the settings,
so a stopped run continues from its last finished round.

Element ids: `finetune-targets`, `finetune-rounds`, `finetune-steps`, `finetune-triggers`, `finetune-dori-steps`,
`finetune-dori-batch`, `finetune-eval-seeds`, `finetune-lr`, `finetune-optimizer`, `finetune-trainable`,
`finetune-utility`, `finetune-ema`, `finetune-run`, `finetune-stop`, `finetune-status`,
`finetune-table`, `finetune-side-effects`, `finetune-held-out`, `finetune-use`, `finetune-export`,
`finetune-export-file`.
"""

from __future__ import annotations

import time

import gradio as gr
import torch

from analysis.dori import DoriSearch
from analysis.export import RunRecord
from analysis.images import to_display
from analysis.finetune import EVALUATION_SEED_OFFSET, AdversarialFineTuning, FineTuneProgress, FineTuneRound
from analysis.localize import cache_key, weights_checksum
from analysis.model import ModelHandle
from analysis.paths import RUNS_DIR
from analysis.task_settings import BUNDLED_MODEL_NAME
from dori_ui.export import build_export
from dori_ui.session import (AppContext, Session, check_number, check_setting, describe_model, session_handle,
                             setting_field, use_finetuned)
from dori_ui.streaming import Stopped, on_model, on_stop, run_and_stop_buttons, run_or_error, stream_task

VIEW = "finetune"
# One folder per model and settings: a rerun with the same settings resumes the checkpoint there.
RUNS = RUNS_DIR / "finetune"
SIDE_EFFECT_COLUMNS = ["outside the targets", "caption or prompt", "before → after"]
DEFAULTS = AdversarialFineTuning()  # the fields open with the engine's defaults
MAX_LR = 1e-2  # far above any rate that keeps the model; a typo guard
# Seconds of one round's stages for one image with the engine's per-round settings on the bundled model, and of the
# once-per-run surrogate generation: `python -m analysis.bench.finetune_round` on this project's 2-core CPU
# (docs/results/bench_finetune_round.md). The view scales them by each stage's work to say how long a run will take.
MEASURED_ROUND = {"triggers": 374.5, "train": 223.0, "evaluate": 125.2}
MEASURED_ONCE = 81.2  # the surrogate images and the side-effect check
# The share of the app's time limit the default run is planned to fill: the machine may be busier than measured.
PLANNED_SHARE = 0.7
# The view's own default triggers per image and round, half the engine's: two rounds then fit the app's limit with
# a margin (the engine's four leave one).
TRIGGERS_PER_ROUND = 2
TRAINABLE = {"the whole UNet (the paper's)": "all", "attention layers": "attn", "cross-attention only": "attn2"}
UTILITY_LOSSES = {"the model's default (latent: distillation; pixel: L_DM)": None,
                  "toward the noise (L_DM, the paper's)": "denoising",
                  "toward the original model (distillation)": "distillation"}

EXPLANATION = """
**What am I looking at?** Pruning neurons or weights does not remove a
memorized image: Dori finds another way in. The paper's answer is training:
each round searches triggers for the chosen images on the current model, then
fine-tunes the UNet so that neither the caption nor those triggers reproduce
the image, while the other images and ordinary captions keep their training.
The table gives, before and after each round, how often the caption and a
*fresh* Dori attack (starts and seeds never used in training) still replicate
each image. Below it, what the training changed elsewhere, with the same seeds
before and after: the other memorized images should still replicate (the
mitigation is meant to be targeted) and held-out prompts should draw what they
did. A few minutes per round on a laptop CPU. Then switch this session
to the fine-tuned model: every other view uses it, and Mitigate can compare it
with the original. *Training settings* open with the paper's choices; training
ordinary captions toward the original model (distillation) or shipping a moving
average of the weights changes ordinary captions less, and unlearns less too
(docs/results/robust_mitigation.md).
"""


def stage_work(parameters: dict, images: int) -> dict[str, float]:
    """Each round stage's work relative to the measured run's (one image, the engine's defaults): the trigger
    search and the evaluation's attack scale with the Dori passes, training with its steps."""
    dori = parameters["dori"]
    passes = dori["steps"] * dori["batch_size"] / (DEFAULTS.dori.steps * DEFAULTS.dori.batch_size)
    return {"triggers": images * passes * parameters["triggers_per_image"] / DEFAULTS.triggers_per_image,
            "train": parameters["steps_per_round"] / DEFAULTS.steps_per_round,
            "evaluate": images * passes * parameters["eval_seeds"] / DEFAULTS.eval_seeds}


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def estimated_seconds(parameters: dict, images: int) -> float:
    """How long a run of the bundled model takes with these settings, from the measured stage seconds."""
    work = stage_work(parameters, images)
    return images * MEASURED_ONCE + parameters["rounds"] * sum(MEASURED_ROUND[k] * work[k] for k in work)


def default_rounds(max_run_seconds: float) -> int:
    """The most rounds (at least 1, at most the engine's default) that one image's run with the view's other
    defaults finishes in within `PLANNED_SHARE` of the app's time limit on the measured machine."""
    one = dict(rounds=1, steps_per_round=DEFAULTS.steps_per_round, triggers_per_image=TRIGGERS_PER_ROUND,
               eval_seeds=DEFAULTS.eval_seeds,
               dori=dict(steps=DEFAULTS.dori.steps, batch_size=DEFAULTS.dori.batch_size))
    per_round = estimated_seconds(one, 1) - MEASURED_ONCE
    fits = int((PLANNED_SHARE * max_run_seconds - MEASURED_ONCE) // per_round)
    return max(1, min(DEFAULTS.rounds, fits))


def duration_note(model: ModelHandle, parameters: dict, images: int, max_run_seconds: float) -> str:
    """What the status says before the run starts: its estimated length on the bundled model, and whether it fits
    the app's limit; for another model, that each finished round tells the rest."""
    if model.name != BUNDLED_MODEL_NAME:
        return "How long a round takes on this model is known after the first one: each finished round says."
    seconds = estimated_seconds(parameters, images)
    note = (f"Estimated: about {duration(seconds)} ({parameters['rounds']} round(s), measured on this "
            f"project's 2-core CPU; a busier machine takes longer).")
    if seconds > max_run_seconds:
        note += (f" **That is more than the app's limit of {max_run_seconds:g} s per run**: the run stops there, "
                 "and a second click resumes from the last finished round.")
    return note


def run_folder(model: ModelHandle, config: dict):
    """The run's folder, named by the model's weights too: a retrained model with the same name starts afresh."""
    return RUNS / cache_key(model.name, weights_checksum(model.unet.parameters()), config)


def before_rows(replication: RunRecord, captions: list[str]) -> list[list]:
    """The base model's caption replication, as the table's "before" rows (Dori is not run on the base)."""
    rows = []
    for caption, metrics in zip(captions, replication):
        rows.append(["before", caption, f"{metrics['rate']:.0%}", round(metrics["mean_similarity"], 3),
                     "—", "—"])
    return rows


def side_effect_rows(record: RunRecord) -> list[list]:
    """Outside the targets: the non-selected images' replication and the held-out prompts' similarity."""
    metrics = record.metrics
    return ([["memorized, not selected", row["caption"], f"{row['before']:.0%} → {row['after']:.0%} replicate"]
             for row in metrics["others"]]
            + [["held-out prompt", row["prompt"], f"similarity {row['similarity']:.3f} (1 = unchanged)"]
               for row in metrics["held_out"]])


def held_out_gallery(record: RunRecord) -> list:
    """Each held-out prompt's first generation before and after fine-tuning, side by side."""
    pairs = []
    for k, row in enumerate(record.metrics["held_out"]):
        before, after = to_display(torch.stack([record.images[f"held_out{k}_before"], record.images[f"held_out{k}_after"]]))
        pairs += [(before, f"before · {row['prompt']}"), (after, f"after · {row['prompt']}")]
    return pairs


def table_columns(similarity: str) -> list[str]:
    """The table's headers, naming the similarity the run is judged with (`ReplicationMetric.label`)."""
    return ["round", "caption", "caption replicates", f"caption {similarity}", "Dori trigger replicates",
            f"Dori {similarity}"]


def round_rows(rows: list[dict]) -> list[list]:
    """Table rows of evaluated targets: a finished run's `record.table`, or one round's as it lands."""
    return [[row["round"] + 1, row["caption"], f"{row['prompt_replication']:.0%}", round(row["prompt_similarity"], 3),
             f"{row['dori_replication']:.0%}", round(row["dori_similarity"], 3)] for row in rows]


def training_parameters(round_count, step_count, trigger_count, search_steps, search_batch, seed_count,
                        learning_rate, optimizer_name: str, trained_part: str, utility_name: str, ema_decay) -> dict:
    """The fields' values, checked, as the "finetune" task's `parameters`."""
    learning_rate = check_number("Learning rate", learning_rate, 0, MAX_LR, low_open=True)
    ema_decay = check_number("The moving average's decay (0 = off, else e.g. 0.99)", ema_decay, 0, 0.9999)
    return dict(
        lr=learning_rate, optimizer=optimizer_name, trainable=TRAINABLE[trained_part],
        utility_loss=UTILITY_LOSSES[utility_name], ema_decay=ema_decay or None,
        rounds=check_setting("Rounds", round_count, AdversarialFineTuning, "rounds"),
        steps_per_round=check_setting("Training steps per round", step_count, AdversarialFineTuning, "steps_per_round"),
        triggers_per_image=check_setting("Triggers per image", trigger_count, AdversarialFineTuning,
                                         "triggers_per_image"),
        eval_seeds=check_setting("Evaluation seeds", seed_count, AdversarialFineTuning, "eval_seeds"),
        dori=dict(steps=check_setting("Dori steps", search_steps, DoriSearch, "steps"),
                  batch_size=check_setting("Dori batch", search_batch, DoriSearch, "batch_size")))


def build_finetune_tab(context: AppContext) -> None:
    """The tab's components and events, inside the caller's `gr.Tab`. Build it after every other tab: its model
    switch refreshes the views registered in `context.on_model_change` so far."""
    handle = context.models.get(context.models.first)
    captions = [m.caption for m in handle.memorized]
    gr.Markdown(EXPLANATION)
    with gr.Row():
        targets = gr.CheckboxGroup(captions, value=captions[:1], label="Images to train away",
                                   elem_id="finetune-targets", scale=3)
        with gr.Column(scale=2):
            with gr.Row():
                rounds = setting_field("Rounds ({range})", AdversarialFineTuning, "rounds", "finetune-rounds",
                                       default_rounds(context.max_run_seconds))
                steps = setting_field("Training steps per round ({range})", AdversarialFineTuning, "steps_per_round",
                                      "finetune-steps")
                triggers = setting_field("Triggers per image and round ({range})", AdversarialFineTuning,
                                         "triggers_per_image", "finetune-triggers", TRIGGERS_PER_ROUND)
            with gr.Row():
                dori_steps = setting_field("Dori steps ({range})", DoriSearch, "steps", "finetune-dori-steps")
                dori_batch = setting_field("Dori batch ({range})", DoriSearch, "batch_size", "finetune-dori-batch")
                eval_seeds = setting_field("Evaluation seeds ({range})", AdversarialFineTuning, "eval_seeds",
                                           "finetune-eval-seeds")
            with gr.Accordion("Training settings", open=False):
                with gr.Row():
                    lr = gr.Number(DEFAULTS.lr, label="Learning rate", elem_id="finetune-lr")
                    optimizer = gr.Dropdown(["adam", "adamw", "sgd"], value=DEFAULTS.optimizer, label="Optimiser",
                                            elem_id="finetune-optimizer")
                    trainable = gr.Dropdown(list(TRAINABLE), label="What trains", elem_id="finetune-trainable",
                                            value=next(k for k, v in TRAINABLE.items() if v == DEFAULTS.trainable))
                with gr.Row():
                    utility = gr.Radio(list(UTILITY_LOSSES), label="Ordinary captions are trained",
                                       value=next(k for k, v in UTILITY_LOSSES.items() if v == DEFAULTS.utility_loss),
                                       elem_id="finetune-utility")
                    ema = gr.Number(DEFAULTS.ema_decay or 0, label="Moving average of the weights: decay (0 = off)",
                                    elem_id="finetune-ema")
            run_button, stop_button = run_and_stop_buttons("Fine-tune", "finetune-run", "finetune-stop")
    status = gr.Markdown(elem_id="finetune-status")
    table = gr.Dataframe(headers=table_columns(handle.replication_metric.label()),
                         label="Replication before and after each round", interactive=False,
                         elem_id="finetune-table")
    side_table = gr.Dataframe(headers=SIDE_EFFECT_COLUMNS, label="What it changed outside the selected images "
                              "(same seeds before and after)", interactive=False, elem_id="finetune-side-effects")
    held_out = gr.Gallery(label="Held-out prompts before and after", columns=8, format="png", interactive=False,
                          height="auto", elem_id="finetune-held-out")
    use_button = gr.Button("Use the fine-tuned model in this session", elem_id="finetune-use")
    build_export(context, VIEW)

    def run(chosen: list[str] | None, round_count: float | None, step_count: float | None,
            trigger_count: float | None, search_steps: float | None, search_batch: float | None,
            seed_count: float | None, learning_rate: float | None, optimizer_name: str, trained_part: str,
            utility_name: str, ema_decay: float | None, session: Session, progress=gr.Progress()):
        model = session_handle(context.models, session)
        names = [m.caption for m in model.memorized]
        if not chosen:
            raise gr.Error("Choose at least one image to train away.")
        unknown = [caption for caption in chosen if caption not in names]
        if unknown:
            raise gr.Error(f"Not memorized images of this model: {unknown}.")
        parameters = training_parameters(round_count, step_count, trigger_count, search_steps, search_batch,
                                         seed_count, learning_rate, optimizer_name, trained_part, utility_name,
                                         ema_decay)
        indices = [names.index(caption) for caption in chosen]
        seeds = list(range(EVALUATION_SEED_OFFSET, EVALUATION_SEED_OFFSET + parameters["eval_seeds"]))
        progress(None, desc="Replication before fine-tuning")
        before = [run_or_error(model, "replicate", dict(image=i, seeds=seeds), {}, session).metrics for i in indices]
        before = before_rows(before, chosen)
        rows = dict(headers=table_columns(model.replication_metric.label()), data=before)
        config = dict(targets=indices, parameters=parameters, resume=True)
        config["out_dir"] = str(run_folder(model, config))
        started, finished_here = time.monotonic(), 0  # a resumed run lands only its remaining rounds
        yield {status: "Fine-tuning… " + duration_note(model, parameters, len(indices), context.max_run_seconds),
               table: rows, side_table: [], held_out: [], context.session: session}
        for event in stream_task(model, "finetune", config, {}, session):
            if isinstance(event, FineTuneRound):
                landed = [dict(target, round=event.round) for target in event.record["targets"]]
                rows = dict(rows, data=rows["data"] + round_rows(landed))
                done, finished_here = event.round + 1, finished_here + 1
                left = (time.monotonic() - started) / finished_here * (event.rounds - done)
                yield {status: f"Round {done} of {event.rounds} finished in {event.record['seconds']:g} s"
                               + (f"; about {duration(left)} left." if done < event.rounds else "."),
                       table: rows, context.session: session}
            elif isinstance(event, FineTuneProgress):
                progress((event.step + 1, event.total), unit="steps",
                         desc=f"Round {event.round + 1} of {event.rounds}: {event.stage}")
            elif isinstance(event, Stopped):
                yield {status: "Stopped. Finished rounds are saved: run again with the same settings to resume.",
                       table: rows, side_table: [], held_out: [], context.session: session}
            elif isinstance(event, RunRecord):
                session.records[VIEW] = event
                yield {status: f"Fine-tuned {len(indices)} image(s) in {parameters['rounds']} round(s); the model is "
                               f"in `{event.metrics['model_dir']}`. Switch to it below.",
                       table: dict(rows, data=before + round_rows(event.table)),
                       side_table: side_effect_rows(event), held_out: held_out_gallery(event),
                       context.session: session}

    on_model(run_button.click, run, context,
             inputs=[targets, rounds, steps, triggers, dori_steps, dori_batch, eval_seeds, lr, optimizer, trainable,
                     utility, ema, context.session],
             outputs=[status, table, side_table, held_out, context.session], api_name="finetune",
             show_progress_on=status)  # finished rounds land in the table: no overlay over it
    on_stop(stop_button, context, status, VIEW)

    def use(session: Session):
        record = session.records.get(VIEW)
        if record is None:
            raise gr.Error("Fine-tune a model first: this session has none yet.")
        tuned = use_finetuned(context.models, session, record)
        return {context.session: session, context.header: describe_model(tuned, session),
                status: f"This session now uses the fine-tuned model {tuned.name}."}

    # The other views show the new model's images and defaults, as after the header's model switch.
    context.refresh_views(on_model(use_button.click, use, context, inputs=context.session,
                                   outputs=[context.session, context.header, status], api_name="finetune_use"))
