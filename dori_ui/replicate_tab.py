"""The Replicate view: generate a training image's caption with several seeds and check each image for a copy."""

from __future__ import annotations

import gradio as gr
import plotly.graph_objects as go

from analysis.images import to_display
from analysis.model import ModelHandle
from analysis.replicate import ReplicationReport, replicate, training_images
from analysis.sampling import DenoisingStep
from dori_ui import MODEL_CONCURRENCY_ID

MAX_SEEDS = 16
MAX_STEPS = 100
DEFAULT_SEEDS = 4
# Wen et al. read the gap in the first steps, where it tells memorized prompts apart.
PLOTTED_STEPS = 10

EXPLANATION = """
Each generated image is compared with the training images by pixel correlation;
above the threshold it counts as a **replica**. The plot shows Wen et al.'s
signal: how far the text moves the model's noise prediction at each of the
first denoising steps, ‖ε(x_t, prompt) − ε(x_t, empty prompt)‖₂. Wen et al.
found this gap much larger for memorized prompts than for ordinary ones.
"""


def check_whole_number(name: str, value: float | None, low: int, high: int) -> None:
    if value is None or not low <= value <= high:
        raise gr.Error(f"{name} must be a whole number from {low} to {high}, got {value}.")


def noise_gap_figure(report: ReplicationReport) -> go.Figure | None:
    """One line per seed: the noise gap at each of the first steps. None without an unconditional prediction."""
    if report.noise_gap_per_step is None:
        return None
    figure = go.Figure()
    steps = list(range(1, min(report.steps, PLOTTED_STEPS) + 1))
    for seed, gaps in zip(report.seeds, report.noise_gap_per_step.tolist()):
        figure.add_trace(go.Scatter(x=steps, y=gaps[:len(steps)], mode="lines+markers", name=f"seed {seed}"))
    figure.update_layout(title=f"Wen et al.: text-conditional noise gap in the first {len(steps)} steps",
                         xaxis_title="denoising step", yaxis_title="‖ε(x_t, y) − ε(x_t, ∅)‖₂",
                         height=360, margin=dict(t=50, b=40))
    return figure


def build_replicate_tab(handle: ModelHandle) -> None:
    """The tab's components and events, inside the caller's `gr.Tab`."""
    with gr.Row():
        with gr.Column(scale=3):
            if handle.memorized:
                training_gallery = gr.Gallery(
                    list(zip(to_display(training_images(handle)), (m.caption for m in handle.memorized))),
                    label="Memorized training images (select one)", columns=4, format="png", allow_preview=False)
            else:
                gr.Markdown("This model comes with no list of memorized training images: type a prompt.")
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", value=handle.memorized[0].caption if handle.memorized else "",
                                placeholder="select a training image or type a prompt")
            with gr.Row():
                n_seeds = gr.Number(DEFAULT_SEEDS, label=f"Seeds (1–{MAX_SEEDS})", precision=0)
                first_seed = gr.Number(0, label="First seed", precision=0)
            with gr.Row():
                steps = gr.Number(handle.default_steps, label=f"Steps (1–{MAX_STEPS})", precision=0)
                guidance = gr.Slider(1.0, 20.0, value=handle.default_guidance, step=0.5, label="Guidance")
            run_button = gr.Button("Replicate", variant="primary")
    gr.Markdown(EXPLANATION)
    replicas = gr.Gallery(label="Generations", columns=4, format="png", interactive=False)
    summary = gr.Markdown()
    noise_gap_plot = gr.Plot(label="Wen et al.'s memorization signal")

    def run(prompt_text: str, seed_count: int | None, seed_start: int | None, step_count: int | None,
            guidance_scale: float, progress=gr.Progress()):
        check_whole_number("Seeds", seed_count, 1, MAX_SEEDS)
        check_whole_number("Steps", step_count, 1, MAX_STEPS)
        if seed_start is None:
            raise gr.Error("First seed is empty.")

        def report_progress(step: DenoisingStep) -> None:
            progress((step.index + 1, step.total), desc="Denoising", unit="steps")

        try:
            report = replicate(handle, prompt_text, range(seed_start, seed_start + seed_count), steps=step_count,
                               guidance=guidance_scale, callback=report_progress)
        except ValueError as err:
            raise gr.Error(str(err)) from err
        return list(zip(to_display(report.images), report.captions())), report.summary(), noise_gap_figure(report)

    run_button.click(run, inputs=[prompt, n_seeds, first_seed, steps, guidance],
                     outputs=[replicas, summary, noise_gap_plot], api_name="replicate",
                     concurrency_id=MODEL_CONCURRENCY_ID, concurrency_limit=1)

    if handle.memorized:
        def pick_training_image(selection: gr.SelectData) -> str:
            return handle.memorized[selection.index].caption

        training_gallery.select(pick_training_image, inputs=None, outputs=prompt, api_name="pick_training_image")
