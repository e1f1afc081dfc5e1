"""The app: a header naming the model, then one tab per view."""

from __future__ import annotations

import gradio as gr

from analysis.model import ModelHandle
from dori_ui.replicate_tab import build_replicate_tab

# Requests that may wait for the model; more are turned away with a "queue full" message.
QUEUE_SIZE = 16

INTRODUCTION = """
A text-to-image diffusion model can **memorize** some of its training images:
prompted with such an image's caption, it draws that image again, nearly
pixel for pixel, whatever the random seed. The Replicate view shows this:
pick a training image, generate its caption with several seeds, and see how
similar each generation is to the training image.
"""


def build_app(handle: ModelHandle) -> gr.Blocks:
    """The whole app for one loaded model, with its queue set up; call `.launch()` on it."""
    # A local research tool: no usage reports to Gradio's servers.
    with gr.Blocks(title="Dori Lab", analytics_enabled=False) as app:
        gr.Markdown(f"# Dori Lab\n**Model:** {handle.name} · **device:** {handle.device} · "
                    f"**dtype:** {str(handle.dtype).removeprefix('torch.')}")
        with gr.Accordion("What am I looking at?", open=False):
            gr.Markdown(INTRODUCTION)
        with gr.Tabs():
            with gr.Tab("Replicate"):
                build_replicate_tab(handle)
    app.queue(max_size=QUEUE_SIZE)
    return app
