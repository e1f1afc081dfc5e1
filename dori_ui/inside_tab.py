"""The Inside view: what the model looks at and when the copy appears, for a caption, a trigger of the same image,
the caption under the session's mitigation and a held-out prompt, with the same seed.

Every number comes from `run_task` ("attention", "timeline", "detect"); the view only lays the records out.
Element ids: `inside-image`, `inside-trigger`, `inside-held-out`, `inside-seed`, `inside-seeds`, `inside-steps`,
`inside-guidance`, `inside-layers`, `inside-first-step`, `inside-last-step`, `inside-attention-run`,
`inside-token`, `inside-maps`, `inside-maps-scale`, `inside-grid`, `inside-timeline-run`, `inside-timeline-plot`,
`inside-scrubber`, `inside-frames`, `inside-detect-run`, `inside-detect-plot`, `inside-summary`, `inside-result`,
`inside-pin-a`, `inside-pin-b`, `inside-pinned-a`, `inside-pinned-b` (and `-image`), `inside-export`,
`inside-export-file`.
"""

from __future__ import annotations

import math

import gradio as gr
import torch

from analysis.export import RunRecord
from analysis.hooks import cross_attention_layers
from analysis.images import to_display
from analysis.inside_tasks import DetectSettings
from analysis.limits import MAX_GUIDANCE, MAX_SEED, MAX_STARTS
from analysis.model import ModelHandle
from analysis.settings import Sampling
from analysis.triggers import METADATA_FILE, TriggerSet, shipped_set_folder
from dori_ui.export import build_export
from dori_ui.inside_figures import MAPS_SCALE, describe, detector_figure, timeline_figure, token_choices, token_word
from dori_ui.session import (AppContext, Session, check_number, check_setting, check_whole_number, mitigation_settings,
                             session_handle, setting_field)
from dori_ui.streaming import on_model, report_to, run_or_error

VIEW = "inside"
CAPTION, TRIGGER, MITIGATED, HELD_OUT = "caption", "trigger", "caption under the mitigation", "held-out prompt"

EXPLANATION = """
**What am I looking at?** The same seed under a memorized image's caption, one of its Dori triggers (from the
Trigger map view's set, or the shipped set), the caption under the session's mitigation (Mitigate view) and a
held-out prompt. **Attention maps**: where the image's positions look, per token (start, words, end and padding,
marked; a trigger has no words, so its positions are shown), summed over the chosen layers and denoising steps
(DAAM). **Timeline**: the clean image x̂₀ the model predicts at every step and its similarity to the training
image: where a curve crosses the threshold and stays, the copy has locked in. **Detectors**: three memorization
signals, each against its spread over the model's non-memorized reference prompts (box: the reference; a point
far outside it is an outlier). Pin two results to keep them side by side.
"""


def _trigger(model: ModelHandle, map_state, image: int, index: int) -> tuple[torch.Tensor | None, str]:
    """Trigger `index` of the image's set: the Trigger map view's when it shows this image, else the shipped one."""
    if map_state is not None and map_state.image == image:
        trigger_set = map_state.trigger_set
    elif (shipped_set_folder(image) / METADATA_FILE).is_file():
        trigger_set = TriggerSet.load(shipped_set_folder(image))
        if trigger_set.config["model"] != model.name:
            return None, "no trigger: the shipped sets are the bundled model's (build one in the Trigger map view)"
    else:
        return None, "no trigger set of this image: load or build one in the Trigger map view"
    index = check_whole_number("Trigger", index, 0, len(trigger_set.triggers) - 1)
    return trigger_set.embeddings[index:index + 1], f"trigger {index}"


def _conditions(model: ModelHandle, state: Session, map_state, caption: str, trigger: float | None,
                held_out: str | None) -> tuple[int, list[tuple[str, dict, dict]], list[str]]:
    """The training image's index, then (label, config, inputs) of each condition that can run, and notes on the
    ones that cannot."""
    captions = [m.caption for m in model.memorized]
    if caption not in captions:
        raise gr.Error(f"Pick a memorized training image from the list, got {caption!r}.")
    image = captions.index(caption)
    runs, notes = [(CAPTION, dict(image=image), {})], []
    embedding, trigger_label = _trigger(model, map_state, image, trigger)
    if embedding is None:
        notes.append(trigger_label)
    else:
        runs.append((f"{TRIGGER} ({trigger_label})", dict(image=image), {"embedding": embedding}))
    mitigation, mask_inputs = mitigation_settings(state)
    if mitigation is None:
        notes.append("no mitigation is active (find one in the Mitigate view)")
    else:
        runs.append((MITIGATED, dict(image=image, mitigation=mitigation), mask_inputs))
    if held_out is not None:
        if held_out not in model.held_out_prompts:
            raise gr.Error(f"Pick a held-out prompt from the list, got {held_out!r}.")
        runs.append((HELD_OUT, dict(image=image, prompt=held_out), {}))
    return image, runs, notes


def _run_all(model, state, kind, runs, settings, progress) -> dict[str, RunRecord]:
    records = {}
    for label, config, inputs in runs:
        records[label] = run_or_error(model, kind, {**config, **settings}, inputs, state, report_to(progress))
        # Re-inserted, so that the result list ends with the latest run.
        state.inside_results.pop(f"{kind} · {label}", None)
        state.inside_results[f"{kind} · {label}"] = records[label]
    # What Export saves: the last result, the one the result list then shows.
    state.records[VIEW] = records[label]
    return records


def _pictures(records: dict[str, RunRecord], name: str) -> list:
    return [(to_display(record.images[name][None])[0], label) for label, record in records.items()
            if name in record.images]


def _latest(state: Session, kind: str) -> dict[str, RunRecord]:
    return {label.removeprefix(f"{kind} · "): record for label, record in state.inside_results.items()
            if label.startswith(f"{kind} · ")}


def _sampling_settings(seed_value, step_count, guidance_scale) -> dict:
    """The seed, steps and guidance every run of the view takes, checked."""
    step_count = check_setting("Steps", step_count, Sampling, "steps")
    return dict(seed=check_whole_number("Seed", seed_value, 0, MAX_SEED), steps=step_count,
                guidance=check_number("Guidance", guidance_scale, 0, MAX_GUIDANCE))


def _results_choice(state: Session):
    """The result list: this session's results, the latest chosen."""
    return gr.update(choices=list(state.inside_results), value=next(reversed(state.inside_results), None))


def _summary(records: dict[str, RunRecord], notes: list[str]) -> str:
    return "\n\n".join([describe(label, record) for label, record in records.items()] + notes)


def _token_pictures(records: dict[str, RunRecord], index: int) -> list:
    """Every condition's map of token `index`, named by the condition and that token in its prompt."""
    return [(to_display(record.images[f"overlay{index}"][None])[0],
             f"{label} · {token_word(record.metrics['tokens'][index])}") for label, record in records.items()]


def _token_grid(records: dict[str, RunRecord]) -> list:
    """Every condition's maps of all its tokens but padding (a trigger's positions as far as the caption's end)."""
    shown = sum(t["kind"] != "padding" for t in records[CAPTION].metrics["tokens"])
    grid = []
    for label, record in records.items():
        tokens = record.metrics["tokens"]
        positions = range(shown) if tokens[0]["kind"] == "position" else [
            i for i, t in enumerate(tokens) if t["kind"] != "padding"]
        grid += [(to_display(record.images[f"overlay{i}"][None])[0], f"{label} · {i}: {token_word(tokens[i])}")
                 for i in positions]
    return grid


def pick_token(index, state: Session):
    if index is None:  # the list emptied by a model switch or a run that has not filled it yet
        return gr.skip()
    records = _latest(state, "attention")
    if not records:
        raise gr.Error("Run “Attention maps” first.")
    length = len(records[CAPTION].metrics["tokens"])
    return _token_pictures(records, check_whole_number("Token", index, 0, length - 1))


def scrub(step, state: Session):
    records = _latest(state, "timeline")
    if not records:
        raise gr.Error("Run “Timeline” first.")
    steps_run = next(iter(records.values())).config["steps"]
    return _pictures(records, f"frame{check_whole_number('Step', step, 0, steps_run - 1)}")


def follow_selection(index):
    """The Trigger map view's selected trigger, as this view's. Anything but a trigger index there (an emptied
    field, a typo that view's own run reports) leaves this field as it is."""
    whole = isinstance(index, (int, float)) and math.isfinite(index) and index == int(index)
    return int(index) if whole and 0 <= index < MAX_STARTS else gr.skip()


def choose(label, state: Session) -> str:
    if label not in state.inside_results:
        raise gr.Error(f"Choose one of this session's results, got {label!r}.")
    state.records[VIEW] = state.inside_results[label]
    return describe(label, state.inside_results[label])


def _pinned_view(state: Session, name: str) -> tuple:
    """Pin `name`'s picture (None without one) and its description, naming its model ("" when nothing is pinned)."""
    label, record = state.inside_pins.get(name, (None, None))
    if record is None:
        return None, ""
    picture = record.images.get("generated")
    return (None if picture is None else to_display(picture[None])[0],
            f"{describe(label, record)}\n\n(on {record.model})")


def build_inside_tab(context: AppContext, map_state: gr.State, selected_trigger: gr.Number) -> None:
    """The tab's components and events, inside the caller's `gr.Tab`; `map_state` is the Trigger map view's set,
    `selected_trigger` the trigger selected there (on the map or in its table), which this view's trigger follows."""
    handle = context.models.get(context.models.first)
    captions = [m.caption for m in handle.memorized]
    gr.Markdown(EXPLANATION)
    with gr.Row():
        image = gr.Dropdown(captions, value=captions[0] if captions else None, label="Training image",
                            elem_id="inside-image")
        trigger = gr.Number(0, label="Trigger (index in the image's set)", precision=None, elem_id="inside-trigger")
        held_out = gr.Dropdown(handle.held_out_prompts, value=(handle.held_out_prompts or [None])[0],
                               label="Held-out prompt", elem_id="inside-held-out")
    with gr.Row():
        seed = gr.Number(0, label="Seed", precision=None, elem_id="inside-seed")
        seeds = setting_field("Detector seeds ({range}, from the seed)", DetectSettings, "seeds", "inside-seeds")
        steps = setting_field("Steps ({range})", Sampling, "steps", "inside-steps", handle.default_steps)
        guidance = gr.Number(handle.default_guidance, label=f"Guidance (0–{MAX_GUIDANCE})", step=0.5,
                             elem_id="inside-guidance")
    with gr.Row():
        layers = gr.Dropdown(list(cross_attention_layers(handle.unet)), multiselect=True, value=[],
                             label="Cross-attention layers of the maps (none chosen: all)", elem_id="inside-layers")
        first_step = gr.Number(0, label="Maps from step", precision=None, elem_id="inside-first-step")
        last_step = gr.Number(handle.default_steps - 1, label="to step", precision=None, elem_id="inside-last-step")
    with gr.Row():
        attention_button = gr.Button("Attention maps", variant="primary", elem_id="inside-attention-run")
        timeline_button = gr.Button("Timeline", variant="primary", elem_id="inside-timeline-run")
        detect_button = gr.Button("Detectors", variant="primary", elem_id="inside-detect-run")
    summary = gr.Markdown(elem_id="inside-summary")
    token = gr.Dropdown([], type="index", label="Token (or trigger position)", elem_id="inside-token")
    maps = gr.Gallery(label="Attention of the chosen token, over the image", columns=4, format="png", height="auto",
                      interactive=False, elem_id="inside-maps")
    gr.HTML(MAPS_SCALE, elem_id="inside-maps-scale")
    with gr.Accordion("Every token's map at once", open=False):
        grid = gr.Gallery(label="All tokens of each prompt (padding left out), over the image", columns=8,
                          format="png", height="auto", interactive=False, elem_id="inside-grid")
    timeline_plot = gr.Plot(label="Denoising timeline", elem_id="inside-timeline-plot")
    scrubber = gr.Slider(0, max(handle.default_steps - 1, 1), value=0, step=1, label="Step (x̂₀ below)",
                         elem_id="inside-scrubber")
    frames = gr.Gallery(label="x̂₀ at the chosen step", columns=4, format="png", height="auto", interactive=False,
                        elem_id="inside-frames")
    detect_plot = gr.Plot(label="Detectors against the reference prompts", elem_id="inside-detect-plot")
    with gr.Row():
        result = gr.Dropdown([], label="A result of this view (also what Export saves)", elem_id="inside-result")
        pin_a = gr.Button("Pin as A", elem_id="inside-pin-a", scale=0)
        pin_b = gr.Button("Pin as B", elem_id="inside-pin-b", scale=0)
    pinned = {}
    with gr.Row():
        for name in ("A", "B"):
            with gr.Column():
                pinned[name] = (gr.Image(label=f"Pinned {name}", format="png", interactive=False, height=200,
                                         elem_id=f"inside-pinned-{name.lower()}-image"),
                                gr.Markdown(elem_id=f"inside-pinned-{name.lower()}"))
    build_export(context, VIEW, "a result of the Inside view")

    def attention(caption, trigger_index, seed_value, step_count, guidance_scale, chosen_layers, first, last,
                  held_out_prompt, state: Session, trigger_map, progress=gr.Progress()):
        model = session_handle(context.models, state)
        chosen = _sampling_settings(seed_value, step_count, guidance_scale)
        first = check_whole_number("Maps from step", first, 0, chosen["steps"] - 1)
        last = check_whole_number("to step", last, first, chosen["steps"] - 1)
        if not isinstance(chosen_layers, list) or not all(isinstance(name, str) for name in chosen_layers):
            raise gr.Error(f"Layers must be a list of layer names, got {chosen_layers!r}.")
        _, runs, notes = _conditions(model, state, trigger_map, caption, trigger_index, held_out_prompt)
        records = _run_all(model, state, "attention", runs, dict(
            chosen, layers=chosen_layers or None, denoising_steps=list(range(first, last + 1))), progress)
        choices = token_choices(records[CAPTION].metrics["tokens"])
        return {token: gr.update(choices=choices, value=1), maps: _token_pictures(records, 1),
                grid: _token_grid(records), summary: _summary(records, notes), result: _results_choice(state),
                context.session: state}

    def timeline(caption, trigger_index, held_out_prompt, seed_value, step_count, guidance_scale, state: Session,
                 trigger_map, progress=gr.Progress()):
        model = session_handle(context.models, state)
        chosen = _sampling_settings(seed_value, step_count, guidance_scale)
        _, runs, notes = _conditions(model, state, trigger_map, caption, trigger_index, held_out_prompt)
        records = _run_all(model, state, "timeline", runs, chosen, progress)
        return {timeline_plot: timeline_figure(records),
                scrubber: gr.update(maximum=max(chosen["steps"] - 1, 1), value=chosen["steps"] - 1),
                frames: _pictures(records, f"frame{chosen['steps'] - 1}"), summary: _summary(records, notes),
                result: _results_choice(state), context.session: state}

    def detect(caption, trigger_index, held_out_prompt, seed_value, seed_count, step_count, guidance_scale,
               state: Session, trigger_map, progress=gr.Progress()):
        model = session_handle(context.models, state)
        chosen = _sampling_settings(seed_value, step_count, guidance_scale)
        count = check_setting("Detector seeds", seed_count, DetectSettings, "seeds")
        start = check_whole_number("Seed", seed_value, 0, MAX_SEED + 1 - count)
        _, runs, notes = _conditions(model, state, trigger_map, caption, trigger_index, held_out_prompt)
        records = _run_all(model, state, "detect", runs, dict(
            steps=chosen["steps"], guidance=chosen["guidance"], seeds=list(range(start, start + count))), progress)
        return {detect_plot: detector_figure(records), summary: _summary(records, notes),
                result: _results_choice(state), context.session: state}

    def pin(name: str):
        def pin_result(label, state: Session) -> dict:
            if label not in state.inside_results:
                raise gr.Error(f"Choose one of this session's results to pin, got {label!r}.")
            state.inside_pins[name] = (label, state.inside_results[label])
            updates = {context.session: state}
            for key, (picture, text) in pinned.items():
                updates[picture], updates[text] = _pinned_view(state, key)
            return updates
        return pin_result

    session, trigger_map = context.session, map_state
    on_model(attention_button.click, attention, context,
             inputs=[image, trigger, seed, steps, guidance, layers, first_step, last_step, held_out, session,
                     trigger_map],
             outputs=[token, maps, grid, summary, result, session], api_name="inside_attention")
    token.change(pick_token, inputs=[token, session], outputs=maps, api_name="inside_token")
    on_model(timeline_button.click, timeline, context,
             inputs=[image, trigger, held_out, seed, steps, guidance, session, trigger_map],
             outputs=[timeline_plot, scrubber, frames, summary, result, session], api_name="inside_timeline")
    scrubber.release(scrub, inputs=[scrubber, session], outputs=frames, api_name="inside_scrub")
    on_model(detect_button.click, detect, context,
             inputs=[image, trigger, held_out, seed, seeds, steps, guidance, session, trigger_map],
             outputs=[detect_plot, summary, result, session], api_name="inside_detect")
    result.input(choose, inputs=[result, session], outputs=summary, api_name="inside_result")
    selected_trigger.change(follow_selection, inputs=selected_trigger, outputs=trigger,
                            api_name="inside_follow_selection")
    pin_outputs = [*pinned["A"], *pinned["B"], session]
    pin_a.click(pin("A"), inputs=[result, session], outputs=pin_outputs, api_name="inside_pin_a")
    pin_b.click(pin("B"), inputs=[result, session], outputs=pin_outputs, api_name="inside_pin_b")

    def refresh(state: Session) -> dict:
        # The results are the previous model's; pins stay, naming their model.
        state.inside_results.clear()
        model = session_handle(context.models, state)
        names = [m.caption for m in model.memorized]
        return {image: gr.update(choices=names, value=names[0] if names else None),
                held_out: gr.update(choices=model.held_out_prompts, value=(model.held_out_prompts or [None])[0]),
                layers: gr.update(choices=list(cross_attention_layers(model.unet)), value=[]),
                steps: model.default_steps, guidance: model.default_guidance, last_step: model.default_steps - 1,
                token: gr.update(choices=[], value=None), maps: [], grid: [], timeline_plot: None, frames: [],
                detect_plot: None}

    context.refresh_on_model_change(VIEW, refresh, [image, held_out, layers, steps, guidance, last_step, token, maps,
                                                    grid, timeline_plot, frames, detect_plot])
