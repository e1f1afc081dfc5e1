"""The Mitigate view: remove the neurons (NeMo) or weights (Wanda) behind a memorized prompt and check the result.

The mask found becomes the session's mitigation: Replicate and Perturb then run
on the mitigated model, so Perturb's Dori search attacks it. Method "none"
removes it again.

Element ids: `mitigate-prompt`, `mitigate-method`, `mitigate-seeds`, `mitigate-sparsity`, `mitigate-refine`,
`mitigate-steps`,
`mitigate-eval-seeds`, `mitigate-run`, `mitigate-stop`, `mitigate-log`, `mitigate-counts`, `mitigate-before`,
`mitigate-after`,
`mitigate-summary`, `mitigate-export`, `mitigate-export-file`.
"""

from __future__ import annotations

import gradio as gr
import plotly.graph_objects as go
import torch

from analysis.export import RunRecord
from analysis.limits import MAX_SEEDS
from analysis.model import ModelHandle
from analysis.progress import TaskProgress
from analysis.replication_tasks import LocalizeSettings
from analysis.settings import Sampling
from analysis.task_settings import record_mask
from dori_ui.export import build_export
from dori_ui.session import (AppContext, ModelChoices, Session, check_number, check_prompt, check_setting,
                             check_whole_number, describe_model, record_similarity, session_handle, session_model,
                             setting_field, verdict_gallery)
from dori_ui.streaming import (Stopped, on_model, on_stop, report_to, run_and_stop_buttons, run_or_error,
                               stream_task)

VIEW = "mitigate"
# NeMo settings beyond its defaults (the tests shrink them for the tiny model).
NEMO_PARAMETERS: dict = {}
METHODS = {"none": None, "NeMo (neurons)": "nemo", "Wanda (weights)": "wanda", "Wen et al. (prompt embedding)": "wen",
           "Adversarially fine-tuned (Fine-tune tab)": "finetuned"}
LOG_LINES = 12  # the progress log shows the latest lines only

EXPLANATION = """
**What am I looking at?** *NeMo* (Hintersdorf et al. 2024) blocks output
neurons of the cross-attention value layers whose activation on the prompt is
an outlier, adding neurons until the first denoising step no longer looks
memorized. Refinement then unblocks every neuron whose return keeps the
first step as unmemorized as the full selection did: a smaller mask, which on
the bundled model can let replication back; untick it to keep the initial
selection. *Wanda* (Chavhan et al. 2024) prunes the feed-forward weights that
matter for the prompt but not for ordinary prompts. The bars count what was
removed per layer; the galleries show the prompt's generations before and after
with the same seeds. The mask then stays active for this session (see the
header): Perturb searches against the mitigated model. *Wen et al.* (2024)
change no weight: at generation time they nudge the prompt's embedding until
its memorization signal is as small as an ordinary prompt's (the plot shows the
signal per iteration). A Dori trigger is an embedding already, so Perturb then
attacks the model as it is. *Adversarially fine-tuned* (the paper's answer)
compares the base model with the one the Fine-tune tab trained in this session,
and switches the session to the tuned model for Perturb.
"""


def counts_figure(record: RunRecord) -> go.Figure:
    """Removed units per layer, as bars."""
    layers = [row["layer"] for row in record.table]
    unit = "neurons" if record.config["method"] == "nemo" else "weights"
    figure = go.Figure(go.Bar(x=layers, y=[row["removed"] for row in record.table],
                              hovertext=[f"{row['removed']} of {row['units']} {unit}" for row in record.table]))
    figure.update_layout(title=f"{unit.capitalize()} removed per layer ({record.metrics['removed_total']} in all)",
                         xaxis_title="layer", yaxis_title=f"removed {unit}", height=340, margin=dict(t=50, b=80))
    return figure


def wen_figure(record: RunRecord) -> go.Figure:
    """Wen et al.'s signal m(y) at each iteration of the mitigation, and the target it stops at."""
    magnitudes = record.metrics["magnitudes"]
    figure = go.Figure([go.Scatter(x=list(range(len(magnitudes))), y=magnitudes, mode="lines+markers", name="m(y)"),
                        go.Scatter(x=[0, max(len(magnitudes) - 1, 1)], y=[record.metrics["target"]] * 2,
                                   mode="lines", name="target", line=dict(dash="dash"))])
    figure.update_layout(title="Wen et al.: memorization signal of the embedding per iteration",
                         xaxis_title="iteration", yaxis_title="m(y)", height=340, margin=dict(t=50, b=40))
    return figure


def stage_gallery(record: RunRecord, prefix: str) -> list:
    """Generations of a record whose images are `{prefix}seed{seed}`, with their similarity and verdict."""
    seeds = record.config["evaluation_seeds" if record.kind == "localize" else "seeds"]
    images = torch.stack([record.images[f"{prefix}seed{seed}"] for seed in seeds])
    return verdict_gallery(images, seeds, record.metrics.get(f"{prefix}similarities"),
                           record.metrics.get(f"{prefix}replicated"), record_similarity(record))


def replication_line(label: str, record: RunRecord, prefix: str) -> str:
    metrics, seeds = record.metrics, len(stage_gallery(record, prefix))
    if f"{prefix}replicated" not in metrics:
        return f"{label}: replication not checked (no training image)."
    return (f"{label}: {sum(metrics[f'{prefix}replicated'])} of {seeds} seeds replicate (mean {record_similarity(record)} "
            f"{sum(metrics[f'{prefix}similarities']) / seeds:.2f}).")


def mitigation_summary(record: RunRecord) -> str:
    metrics = record.metrics
    if record.kind == "wen":
        magnitudes = metrics["magnitudes"]
        lines = [f"**Wen et al.** moved the embedding of “{record.config['prompt']}” in {len(magnitudes) - 1} "
                 f"iterations: m(y) {magnitudes[0]:.3f} → {magnitudes[-1]:.3f} (target {metrics['target']:.3f}, "
                 f"{'reached' if metrics['reached'] else 'not reached'}). No weight changed."]
    else:
        lines = [f"**{record.config['method']}** removed {metrics['removed_total']} units for "
                 f"“{record.config['prompt']}”."]
    lines.append(replication_line("Before", record, "before_") + " " + replication_line("After", record, "after_"))
    if metrics.get("similarity") is not None:
        lines.append(f"NeMo's criterion: first-step similarity {metrics['similarity']:.3f} "
                     f"against the threshold τ = {metrics['threshold']:.3f}.")
    return "\n\n".join(lines)


def mitigation_config(handle: ModelHandle, method: str, prompt_text: object, seed_count: object,
                      sparsity_percent: object, refine_nemo: bool, step_count: object,
                      eval_count: object) -> tuple[str, dict]:
    """The task kind and settings of a mitigation `method` (a `METHODS` value but None), from the fields, checked:
    "localize" (NeMo, Wanda), "wen", or "replicate" for the fine-tuned comparison (`finetuned_comparison`)."""
    prompt_text = check_prompt(handle, prompt_text)
    seeds = list(range(check_whole_number("Localizer seeds", seed_count, 2, MAX_SEEDS)))
    schedule = check_setting("Schedule steps", step_count, Sampling, "steps")
    evaluation_seeds = list(range(check_setting("Seeds before/after", eval_count, LocalizeSettings,
                                                "evaluation_seeds")))
    parameters = dict(steps=schedule)
    if method == "wanda":
        sparsity_percent = check_number("Wanda sparsity (%)", sparsity_percent, 0, 50, low_open=True)
        parameters.update(sparsity=sparsity_percent / 100, record_steps=min(5, schedule))
    elif method == "nemo":
        parameters.update(NEMO_PARAMETERS, refine=bool(refine_nemo))
    captions = [m.caption for m in handle.memorized]
    image = captions.index(prompt_text) if prompt_text in captions else None
    if method in ("finetuned", "wen"):
        # Wen's mitigation is checked against a training image, and leaves the weights (and no mask) behind.
        return ("replicate" if method == "finetuned" else "wen",
                dict(image=image, prompt=prompt_text, seeds=evaluation_seeds, steps=schedule))
    return "localize", dict(image=image, prompt=prompt_text, method=method, parameters=parameters, seeds=seeds,
                            evaluation_seeds=evaluation_seeds)


def finetuned_comparison(models: ModelChoices, config: dict, state: Session, progress) -> tuple[list, str]:
    """The base and the fine-tuned model of the session's Fine-tune run, generating `config` ("replicate"
    settings): their records, and the comparison in words. Switches the session to the tuned model."""
    if state.finetuned is None:
        raise gr.Error("No adversarially fine-tuned model in this session yet: fine-tune one in the Fine-tune "
                       "tab, then compare it here.")
    base_name, tuned_name = state.finetuned
    records = [run_or_error(session_model(models, state, name), "replicate", config, {}, state, report_to(progress))
               for name in (base_name, tuned_name)]
    # Perturb attacks what Mitigate produced: here the tuned model.
    state.model, state.mask, state.records[VIEW] = tuned_name, None, records[1]
    text = (f"**Adversarially fine-tuned** model {tuned_name} against its base {base_name}, prompt "
            f"“{config['prompt']}”.\n\n" + replication_line("Base", records[0], "") + " "
            + replication_line("Fine-tuned", records[1], ""))
    return records, text


def build_mitigate_tab(context: AppContext) -> None:
    """The tab's components and events, inside the caller's `gr.Tab`."""
    handle = context.models.get(context.models.first)
    captions = [m.caption for m in handle.memorized]
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Dropdown(captions, value=captions[0] if captions else None, allow_custom_value=True,
                                 label="Prompt to mitigate (a training image's caption, or type one)",
                                 elem_id="mitigate-prompt")
            method = gr.Radio(list(METHODS), value="NeMo (neurons)", label="Mitigation", elem_id="mitigate-method")
        with gr.Column(scale=2):
            with gr.Row():
                n_seeds = gr.Number(4, label=f"Localizer seeds (2–{MAX_SEEDS})", precision=None,
                                    elem_id="mitigate-seeds")
                sparsity = gr.Number(1.0, label="Wanda sparsity (% of each row compared, 0–50)",
                                     elem_id="mitigate-sparsity")
            # NeMo's second stage unblocks every neuron it can spare; without it the mask is the initial selection.
            refine = gr.Checkbox(True, label="NeMo refinement (fewer neurons; one criterion check per neuron)",
                                 elem_id="mitigate-refine")
            with gr.Row():
                steps = setting_field("Schedule steps ({range})", Sampling, "steps", "mitigate-steps",
                                      handle.default_steps)
                eval_seeds = setting_field("Seeds before/after ({range})", LocalizeSettings, "evaluation_seeds",
                                           "mitigate-eval-seeds")
            run_button, stop_button = run_and_stop_buttons("Mitigate", "mitigate-run", "mitigate-stop")
    gr.Markdown(EXPLANATION)
    log = gr.Textbox(label="Progress", lines=4, max_lines=LOG_LINES, interactive=False, elem_id="mitigate-log")
    summary = gr.Markdown(elem_id="mitigate-summary")
    counts = gr.Plot(label="Removed per layer (NeMo, Wanda) or the signal per iteration (Wen)",
                     elem_id="mitigate-counts")
    with gr.Row():
        before = gr.Gallery(label="Before", columns=4, format="png", interactive=False, height="auto",
                            elem_id="mitigate-before")
        after = gr.Gallery(label="After (mitigated)", columns=4, format="png", interactive=False, height="auto",
                           elem_id="mitigate-after")
    build_export(context, VIEW)

    def run(prompt_text: str | None, method_label: str, seed_count: float | None, sparsity_percent: float | None,
            refine_nemo: bool, step_count: float | None, eval_count: float | None, state: Session,
            progress=gr.Progress()):
        model = session_handle(context.models, state)
        if method_label not in METHODS:
            raise gr.Error(f"Unknown mitigation {method_label!r}; choose one of {list(METHODS)}.")
        chosen = METHODS[method_label]
        if chosen is None:
            state.mask = None
            state.records.pop(VIEW, None)
            yield {log: "Mitigation removed.", summary: "No mitigation: the session uses the model as it is.",
                   counts: None, before: [], after: [], context.header: describe_model(model, state),
                   context.session: state}
            return
        kind, config = mitigation_config(model, chosen, prompt_text, seed_count, sparsity_percent, refine_nemo,
                                         step_count, eval_count)
        if kind == "replicate":
            records, text = finetuned_comparison(context.models, config, state, progress)
            yield {log: "Done.", summary: text, counts: None, before: stage_gallery(records[0], ""),
                   after: stage_gallery(records[1], ""), context.header: describe_model(
                       session_model(context.models, state, state.model), state), context.session: state}
            return
        # A stopped or failed run leaves nothing to export, not the run before it.
        state.records.pop(VIEW, None)
        lines: list[str] = []
        report = report_to(progress)
        for event in stream_task(model, kind, config, {}, state):
            report(event)
            if isinstance(event, TaskProgress):
                lines = [*lines, event.message][-LOG_LINES:]
                yield {log: "\n".join(lines), context.session: state}
            elif isinstance(event, Stopped):
                yield {log: "\n".join([*lines, "Stopped."]), context.session: state}
            elif isinstance(event, RunRecord):
                state.mask = record_mask(event) if kind == "localize" else None
                state.records[VIEW] = event
                yield {log: "\n".join([*lines, "Done."]), summary: mitigation_summary(event),
                       counts: counts_figure(event) if kind == "localize" else wen_figure(event),
                       before: stage_gallery(event, "before_"), after: stage_gallery(event, "after_"),
                       context.header: describe_model(model, state), context.session: state}

    on_model(run_button.click, run, context,
             inputs=[prompt, method, n_seeds, sparsity, refine, steps, eval_seeds, context.session],
             outputs=[log, summary, counts, before, after, context.header, context.session], api_name="mitigate",
             show_progress_on=summary)  # the log streams: no overlay over it, nor over the header

    on_stop(stop_button, context, log, VIEW)

    def refresh(state: Session) -> dict:
        model = session_handle(context.models, state)
        names = [m.caption for m in model.memorized]
        return {prompt: gr.update(choices=names, value=names[0] if names else None), steps: model.default_steps,
                log: "", summary: "", counts: None, before: [], after: []}

    context.refresh_on_model_change(VIEW, refresh, [prompt, steps, log, summary, counts, before, after])
