"""The Replicate view: generate a training image's caption with several seeds and check each image for a copy.

Element ids: `replicate-training` (gallery of memorized images), `replicate-sd14` (SD v1.4 prompt table, shown
for latent SD models), `replicate-prompt`, `replicate-seeds`, `replicate-first-seed`, `replicate-steps`,
`replicate-guidance`, `replicate-run`, `replicate-stop`, `replicate-training-image` (the caption's training image,
beside the generations), `replicate-gallery`, `replicate-summary`, `replicate-plot`,
`replicate-export`, `replicate-export-file`.
"""

from __future__ import annotations

import csv
import re
from functools import cache

import gradio as gr
import plotly.graph_objects as go
import torch

from analysis.export import RunRecord
from analysis.images import to_display
from analysis.limits import MAX_GUIDANCE, MAX_SEED
from analysis.model import REPO_ROOT, ModelHandle
from analysis.replicate import training_images
from analysis.replication_tasks import ReplicateSettings
from analysis.settings import Sampling
from dori_ui.export import build_export
from dori_ui.session import (AppContext, Session, check_number, check_prompt, check_setting, check_whole_number,
                             mitigation_settings, record_similarity, session_handle, setting_field)
from dori_ui.streaming import on_model, on_stop, report_to, run_and_stop_buttons, run_or_error

VIEW = "replicate"
# Wen et al. read the gap in the first steps, where it tells memorized prompts apart.
PLOTTED_STEPS = 10
SD14_PROMPTS = REPO_ROOT / "assets" / "sd14_memorization" / "memorized_laion_prompts.csv"
SD14_COLUMNS = ["prompt", "type", "max SSCD"]

EXPLANATION = """
**What am I looking at?** Each generated image is compared with the training
images by the app's replication metric (the header names it: pixel
correlation, or SSCD when the app was started with `--sscd`); above its
threshold it counts as a **replica**. Training images of any size are
centre-cropped and resized to the model's resolution.
The plot shows Wen et al.'s signal: how far the text moves the model's noise
prediction at each of the first denoising steps, ‖ε(x_t, prompt) − ε(x_t, empty
prompt)‖₂. Wen et al. found this gap much larger for memorized prompts than for
ordinary ones; the grey band is its spread over the model's non-memorized
reference prompts (computed once per model), so a curve above it stands out. When a mitigation is active (header), generations run with it.
"""


@cache
def sd14_prompts() -> list[list]:
    """SD v1.4's memorized LAION prompts (NeMo's list): [caption, VM/TM, max SSCD or None], verbatim ones first."""
    with SD14_PROMPTS.open(newline="") as file:
        # A few template rows have no SSCD measured.
        rows = [[row["Caption"], row["type"], round(float(row["max_sscd"]), 3) if row["max_sscd"] else None]
                for row in csv.DictReader(file, delimiter=";")]
    return sorted(rows, key=lambda row: (row[1] != "VM", -(row[2] or 0.0)))


def readable_prompt(prompt: str) -> str:
    """A LAION caption as a reader should see it in the table: without the HTML tags some carry (`<i>`) and
    without the CSV quoting a few kept, once or twice over (`"…""Lifted Up""…"`). Selecting a row still gives the
    exact prompt."""
    while len(prompt) > 1 and prompt.startswith('"') and prompt.endswith('"'):
        prompt = prompt[1:-1].replace('""', '"')
    return re.sub(r"</?[a-zA-Z]+>", "", prompt)


def sd14_rows() -> list[list]:
    """`sd14_prompts` as the table shows them."""
    return [[readable_prompt(prompt), *rest] for prompt, *rest in sd14_prompts()]


def lists_sd14_prompts(handle: ModelHandle) -> bool:
    """The SD v1.4 list is offered for latent (VAE) Stable Diffusion models, which it was measured on."""
    return not handle.pixel_space


def noise_gap_figure(record: RunRecord, reference: RunRecord | None = None) -> go.Figure | None:
    """One line per seed: the noise gap at each of the first steps, over the band (5th to 95th percentile, and
    median) of the model's reference prompts from a "reference" record. None without an unconditional prediction."""
    gaps = record.tensors.get("noise_gap_per_step")
    if gaps is None:
        return None
    figure = go.Figure()
    steps = list(range(1, min(gaps.shape[1], PLOTTED_STEPS) + 1))
    if reference is not None:
        band = reference.metrics["reference"]["noise_gap_per_step"]
        label = f"reference prompts ({reference.metrics['reference_prompts']}): 5–95th percentile"
        figure.add_trace(go.Scatter(x=steps + steps[::-1], y=band["p95"][:len(steps)] + band["p05"][:len(steps)][::-1],
                                    fill="toself", fillcolor="rgba(127,127,127,0.25)", line=dict(width=0),
                                    name=label, hoverinfo="skip"))
        figure.add_trace(go.Scatter(x=steps, y=band["median"][:len(steps)], mode="lines", name="reference median",
                                    line=dict(color="#7f7f7f", dash="dash")))
    for seed, per_step in zip(record.config["seeds"], gaps.tolist()):
        figure.add_trace(go.Scatter(x=steps, y=per_step[:len(steps)], mode="lines+markers", name=f"seed {seed}"))
    figure.update_layout(title=f"Wen et al.: text-conditional noise gap in the first {len(steps)} steps",
                         xaxis_title="denoising step", yaxis_title="‖ε(x_t, y) − ε(x_t, ∅)‖₂",
                         height=360, margin=dict(t=50, b=40))
    return figure


def replication_summary(record: RunRecord) -> str:
    """The replication rate in words and Wen et al.'s score, from a replicate record's metrics."""
    metrics, config = record.metrics, record.config
    if "replicated" not in metrics:
        lines = ["This model has no known training images, so replication is not checked."]
    else:
        target = "the training image" if config["image"] is not None else "a memorized training image"
        lines = [f"{sum(metrics['replicated'])} of {len(config['seeds'])} seeds replicate {target} "
                 f"(rate {metrics['rate']:.0%}; replicated = {record_similarity(record)} > {config['threshold']})."]
    if "wen_first_step" in metrics:
        lines.append(f"Wen et al.'s score (noise gap at the first step, mean over seeds): "
                     f"{metrics['wen_first_step']:.3f}.")
    if config["mitigation"] is not None:
        lines.append(f"Generated with the session's mitigation ({metrics['mitigation_removed']} units removed).")
    return "\n\n".join(lines)


def memorized_gallery(handle: ModelHandle) -> list:
    if not handle.memorized:
        return []
    return list(zip(to_display(training_images(handle)), (m.caption for m in handle.memorized)))


def training_picture(handle: ModelHandle, prompt: object):
    """The training image whose caption `prompt` is, for display; None for any other prompt."""
    captions = [m.caption for m in handle.memorized]
    if not isinstance(prompt, str) or prompt.strip() not in captions:
        return None
    return to_display(handle.memorized[captions.index(prompt.strip())].image[None])[0]


def pick_sd14_prompt(selection: gr.SelectData) -> str:
    return sd14_prompts()[selection.index[0]][0]


def build_replicate_tab(context: AppContext) -> None:
    """The tab's components and events, inside the caller's `gr.Tab`."""
    handle = context.models.get(context.models.first)
    with gr.Row():
        with gr.Column(scale=3):
            training_gallery = gr.Gallery(
                memorized_gallery(handle), label="Memorized training images (select one)", columns=4, format="png",
                allow_preview=False, height="auto", visible=bool(handle.memorized), elem_id="replicate-training")
            sd14_table = gr.Dataframe(
                sd14_rows(), headers=SD14_COLUMNS, label="Stable Diffusion v1.4's memorized LAION prompts "
                "(NeMo's list, MIT licence; select one: the Prompt box gets it exactly, HTML tags included)",
                interactive=False, max_height=320, wrap=True, column_widths=["76%", "10%", "14%"],
                visible=lists_sd14_prompts(handle), elem_id="replicate-sd14")
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", value=handle.memorized[0].caption if handle.memorized else "",
                                placeholder="select a training image or type a prompt", elem_id="replicate-prompt")
            with gr.Row():
                n_seeds = setting_field("Seeds ({range})", ReplicateSettings, "seeds", "replicate-seeds")
                first_seed = gr.Number(0, label="First seed", precision=None, elem_id="replicate-first-seed")
            with gr.Row():
                steps = setting_field("Steps ({range})", Sampling, "steps", "replicate-steps", handle.default_steps)
                guidance = gr.Number(handle.default_guidance, label=f"Guidance (0–{MAX_GUIDANCE})", step=0.5,
                                     elem_id="replicate-guidance")
            run_button, stop_button = run_and_stop_buttons("Replicate", "replicate-run", "replicate-stop")
    gr.Markdown(EXPLANATION)
    with gr.Row():
        training_image = gr.Image(training_picture(handle, prompt.value), label="Training image of this caption",
                                  format="png", interactive=False, height=260, scale=1,
                                  elem_id="replicate-training-image")
        replicas = gr.Gallery(label="Generations", columns=4, format="png", interactive=False, height="auto",
                              scale=4, elem_id="replicate-gallery")
    summary = gr.Markdown(elem_id="replicate-summary")
    noise_gap_plot = gr.Plot(label="Wen et al.'s memorization signal", elem_id="replicate-plot")
    build_export(context, VIEW)

    def run(prompt_text: str, seed_count: float | None, seed_start: float | None, step_count: float | None,
            guidance_scale: float, state: Session, progress=gr.Progress()):
        model = session_handle(context.models, state)
        prompt_text = check_prompt(model, prompt_text)
        seed_count = check_setting("Seeds", seed_count, ReplicateSettings, "seeds")
        step_count = check_setting("Steps", step_count, Sampling, "steps")
        seed_start = check_whole_number("First seed", seed_start, 0, MAX_SEED + 1 - seed_count)
        captions = [m.caption for m in model.memorized]
        mitigation, inputs = mitigation_settings(state)
        # A training image's own caption is compared with that image; any other prompt with all of them.
        config = dict(image=captions.index(prompt_text) if prompt_text in captions else None, prompt=prompt_text,
                      seeds=list(range(seed_start, seed_start + seed_count)), steps=step_count,
                      guidance=check_number("Guidance", guidance_scale, 0, MAX_GUIDANCE), mitigation=mitigation)
        record = run_or_error(model, "replicate", config, inputs, state, report_to(progress))
        state.records[VIEW] = record
        images = [record.images[f"seed{seed}"] for seed in config["seeds"]]
        gallery = list(zip(to_display(torch.stack(images)), (row["caption"] for row in record.table)))
        shown = {replicas: gallery, summary: replication_summary(record), noise_gap_plot: noise_gap_figure(record),
                 context.session: state}
        yield shown
        # The reference band comes after the gallery: on a fresh install it is computed (and cached) first. The last
        # output is whole, as an API client reads it.
        if "noise_gap_per_step" in record.tensors:
            reference = run_or_error(model, "reference", dict(steps=step_count, guidance=config["guidance"]), {},
                                     state, report_to(progress))
            yield {**shown, noise_gap_plot: noise_gap_figure(record, reference)}

    on_model(run_button.click, run, context, inputs=[prompt, n_seeds, first_seed, steps, guidance, context.session],
             outputs=[replicas, summary, noise_gap_plot, context.session], api_name="replicate",
             show_progress_on=summary)  # the gallery lands before the reference band: no overlay over it
    on_stop(stop_button, context, summary, VIEW)

    def pick_training_image(state: Session, selection: gr.SelectData) -> str:
        return session_handle(context.models, state).memorized[selection.index].caption

    training_gallery.select(pick_training_image, inputs=context.session, outputs=prompt,
                            api_name="pick_training_image")

    def show_training_image(prompt_text: object, state: Session):
        return training_picture(session_handle(context.models, state), prompt_text)

    prompt.change(show_training_image, inputs=[prompt, context.session], outputs=training_image,
                  api_name="replicate_training_image")

    sd14_table.select(pick_sd14_prompt, inputs=None, outputs=prompt, api_name="pick_sd14_prompt")

    def refresh(state: Session) -> dict:
        model = session_handle(context.models, state)
        return {training_gallery: gr.update(value=memorized_gallery(model), visible=bool(model.memorized)),
                sd14_table: gr.update(visible=lists_sd14_prompts(model)),
                prompt: model.memorized[0].caption if model.memorized else "", steps: model.default_steps,
                guidance: model.default_guidance, replicas: [], summary: "", noise_gap_plot: None}

    context.refresh_on_model_change(VIEW, refresh, [training_gallery, sd14_table, prompt, steps, guidance, replicas,
                                                    summary, noise_gap_plot])
