"""The app: a header naming the model (with a switch among the allowed ones), then one tab per view.

Stable element ids (for browser tests): `model-choice`, `model-switch`, `model-header`, `memorized-choice`,
`memorized-switch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import gradio as gr

from analysis.limits import MAX_RUN_SECONDS, MAX_UPLOAD_BYTES
from analysis.model import ModelHandle
from dori_ui.attribution_tab import build_attribution_tab
from dori_ui.export import remove_exports
from dori_ui.finetune_tab import build_finetune_tab
from dori_ui.inside_tab import build_inside_tab
from dori_ui.mitigate_tab import build_mitigate_tab
from dori_ui.paths_tab import build_paths_tab
from dori_ui.perturb_tab import build_perturb_tab
from dori_ui.replicate_tab import build_replicate_tab
from dori_ui.session import AppContext, ModelChoices, Session, describe_model, session_handle, session_model
from dori_ui.streaming import cancel_route, on_model
from dori_ui.trigger_map_tab import build_trigger_map_tab

# Requests that may wait for the model; more are turned away with a "queue full" message.
QUEUE_SIZE = 16
CACHE_CLEANUP = (3600, 86400)  # (every, older than) in seconds: Gradio's copies of uploads and exports
# How often Gradio's queue looks for a new event and for progress to send, in seconds. Gradio's own values (1 ms and
# 10 ms; 50 ms and 100 ms on Windows) keep its event loop waking all the time, which took CPU from the model's
# computations (docs/results/bench_queue_polling.md); these are its Windows values.
QUEUE_POLL_S = 0.05
PROGRESS_POLL_S = 0.1

# Page style every server of the app uses (`launch_options`).
STYLE = """
/* A gallery caption (verdict, similarity, seed) in full, on as many lines as it needs. */
.caption-label { white-space: normal !important; max-width: 100% !important; text-overflow: clip !important; }
/* An empty gallery or plot (no run yet) takes one line, not a large placeholder, until it holds something. */
.block .empty.large, .block .empty.unpadded_box { min-height: 3rem !important; height: 3rem !important; }
"""

INTRODUCTION = """
A text-to-image diffusion model can **memorize** some of its training images:
prompted with such an image's caption, it draws that image again, nearly
pixel for pixel, whatever the random seed. *Finding Dori* (Kowalczuk et al.
2025) shows that removing the neurons or weights that seem responsible does
not remove the memory: a search over text embeddings finds it again, because
memorization is not local.

**Replicate** shows the memorization. **Mitigate** removes neurons or weights
(NeMo, Wanda) and checks whether the image is gone. **Perturb** runs the Dori
search against the mitigated model and brings it back. **Trigger map** puts
many triggers of one image on a map beside ordinary prompts: do they gather
in one place, or spread out like unrelated prompts? **Paths & masks** compares
the activations and the NeMo/Wanda masks of those triggers layer by layer.
**Attribution** shows which words of a prompt drive the memorization signal.
**Inside** shows where the model looks (cross-attention maps), when the copy
appears during denoising, and three memorization detectors against ordinary
prompts, for a caption, a trigger, the mitigated caption and a held-out prompt.
**Fine-tune** trains the memory away against Dori's triggers (the paper's
mitigation) and switches the session to the tuned model. A view's "Export ZIP" saves
its last run (settings, seeds, images, table, tensors) so that `dori rerun`
reproduces it. The header names the model, its device and dtype, and
the session's active mitigation; your results are your own, not shared with
other users of the same app.
"""


def build_app(handle: ModelHandle, sources: Sequence[str] = (), allowed_roots: Sequence[str | Path] = (),
              max_run_seconds: float = MAX_RUN_SECONDS) -> gr.Blocks:
    """The whole app with `handle` loaded first, its queue set up; call `.launch()` on it (`launch_options`
    gives the upload limit).

    `sources`: further models (folders or hub ids) a session may switch to;
    `allowed_roots`: folders whose pipeline folders it may switch to as well;
    `max_run_seconds`: a model event still running after this long is stopped, with a message.
    """
    if not max_run_seconds > 0:
        raise ValueError(f"max_run_seconds must be positive, got {max_run_seconds}")
    models = ModelChoices(handle, sources, allowed_roots)
    # A local research tool: no usage reports to Gradio's servers. Gradio's copies of uploads and exports older
    # than a day are deleted every hour.
    with gr.Blocks(title="Dori Lab", analytics_enabled=False, delete_cache=CACHE_CLEANUP) as app:
        session = gr.State(models.new_session(), delete_callback=remove_exports)
        gr.Markdown("# Dori Lab")
        with gr.Row():
            header = gr.Markdown(describe_model(handle, models.new_session()), elem_id="model-header")
            choice = gr.Dropdown(models.names(), value=handle.name, label="Model (from the command line or the "
                                 "allowed roots)", allow_custom_value=True, elem_id="model-choice", scale=0,
                                 min_width=320)
            switch = gr.Button("Switch model", elem_id="model-switch", scale=0)
        with gr.Row():
            memorized_choice = gr.Dropdown(
                ["", *models.memorized_sets()], value="", allow_custom_value=True, elem_id="memorized-choice",
                label="Memorized set: an imagefolder (images + metadata.csv or metadata.jsonl with file_name and text) "
                      "in an allowed root; empty for the model's own. Images are centre-cropped and resized to the "
                      "model's resolution.")
            memorized_switch = gr.Button("Use memorized set", elem_id="memorized-switch", scale=0)
        with gr.Accordion("What am I looking at?", open=False):
            gr.Markdown(INTRODUCTION)
        context = AppContext(models, session, header, max_run_seconds=max_run_seconds)
        with gr.Tabs():
            with gr.Tab("Replicate", id="replicate"):
                build_replicate_tab(context)
            with gr.Tab("Mitigate", id="mitigate"):
                build_mitigate_tab(context)
            with gr.Tab("Perturb", id="perturb"):
                build_perturb_tab(context)
            with gr.Tab("Trigger map", id="trigger_map"):
                trigger_map, selected_trigger = build_trigger_map_tab(context)
            with gr.Tab("Paths & masks", id="paths"):
                build_paths_tab(context, trigger_map)
            with gr.Tab("Attribution", id="attribution"):
                build_attribution_tab(context)
            with gr.Tab("Inside", id="inside"):
                build_inside_tab(context, trigger_map, selected_trigger)
            # Last: its model switch refreshes the views registered before it.
            with gr.Tab("Fine-tune", id="finetune"):
                build_finetune_tab(context)

        def switch_model(name: str | None, state: Session):
            if not isinstance(name, str) or not name.strip():
                raise gr.Error("Choose a model from the list (or type a pipeline folder inside an allowed root).")
            chosen = session_model(models, state, name.strip())
            if chosen.name == state.model:
                # Nothing changes: the session keeps its mitigation and its results waiting to be exported.
                raise gr.Error(f"The session already uses {chosen.name}: nothing to switch.")
            # A mask names layers of the model it was found on, and records belong to that model too; a memorized
            # set chosen for the previous model gives way to the new model's own.
            state.model, state.mask, state.records, state.attributions = chosen.name, None, {}, {}
            state.memorized_set = None
            return {session: state, header: describe_model(chosen, state),
                    choice: gr.update(choices=models.names(), value=chosen.name)}

        def switch_memorized(folder: str | None, state: Session):
            if folder is not None and not isinstance(folder, str):
                raise gr.Error("Choose a memorized set from the list (or type a folder inside an allowed root).")
            chosen_set = (folder or "").strip() or None
            if chosen_set == state.memorized_set:
                raise gr.Error("The session already uses this memorized set: nothing to switch.")
            previous, state.memorized_set = state.memorized_set, chosen_set
            try:
                chosen = session_handle(models, state)
            except gr.Error:
                state.memorized_set = previous
                raise
            # Records and attributions name images of the previous set by index.
            state.records, state.attributions = {}, {}
            return {session: state, header: describe_model(chosen, state)}

        context.refresh_views(on_model(switch.click, switch_model, context, inputs=[choice, session],
                                       outputs=[session, header, choice], api_name="switch_model"), endpoints=True)
        context.refresh_views(on_model(memorized_switch.click, switch_memorized, context,
                                       inputs=[memorized_choice, session], outputs=[session, header],
                                       api_name="switch_memorized"))
    app.queue(max_size=QUEUE_SIZE)
    set_queue_polling(app, QUEUE_POLL_S, PROGRESS_POLL_S)
    return app


def set_queue_polling(app: gr.Blocks, event_seconds: float, progress_seconds: float) -> None:
    """Set how often `app`'s queue looks for a new event and for progress to send. Gradio has no setting for
    these: they are attributes of its queue, so a Gradio that renamed them is refused here, not silently ignored."""
    queue = app._queue
    for name in ("sleep_when_free", "progress_update_sleep_when_free"):
        if not isinstance(getattr(queue, name, None), float):
            raise RuntimeError(f"Gradio {gr.__version__}'s queue has no {name}: update set_queue_polling")
    queue.sleep_when_free, queue.progress_update_sleep_when_free = event_seconds, progress_seconds


def launch_options(max_upload_bytes: int = MAX_UPLOAD_BYTES) -> dict:
    """`app.launch` settings every server of the app uses: the upload limit (Gradio refuses a larger file), the
    page's style and a cancel that stops only the event it names (`streaming.cancel_route`)."""
    return dict(max_file_size=max_upload_bytes, css=STYLE, app_kwargs=dict(routes=[cancel_route()]))
