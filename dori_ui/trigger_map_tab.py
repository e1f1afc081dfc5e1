"""The Trigger map view: many Dori triggers of one image on a 2-D map, beside prompts and random embeddings.

A trigger set is loaded from assets/triggers/ (shipped for the bundled model)
or built here (resumable: a stopped build continues where it stopped). Rows of
the table are the map's triggers: selecting one, or clicking its point on the map, generates it (and picks it as
the Inside view's trigger); two can be
pinned side by side. The map is one `run_task("trigger_map", ...)` (the
projection and every set's dispersion); Export saves it.

Element ids: `trigger-map-image`, `trigger-map-source`, `trigger-map-count`, `trigger-map-steps`,
`trigger-map-eval-seeds`, `trigger-map-method`, `trigger-map-colour`, `trigger-map-load`, `trigger-map-stop`,
`trigger-map-status`, `trigger-map-plot`, `trigger-map-table`, `trigger-map-index`, `trigger-map-seeds`,
`trigger-map-show`, `trigger-map-selected`, `trigger-map-selected-summary`, `trigger-map-pin-a`,
`trigger-map-pin-b`, `trigger-map-pinned-a`, `trigger-map-pinned-b`, `trigger_map-export`,
`trigger_map-export-file`.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from functools import cache

import gradio as gr
import plotly.graph_objects as go
import torch

from analysis.dori import DoriSearch
from analysis.limits import MAX_SEEDS, MAX_STARTS
from analysis.localize import cache_key
from analysis.model import ModelHandle
from analysis.paths import RUNS_DIR
from analysis.projection import METHODS, warm_up
from analysis.sampling import SamplingCancelled
from analysis.tasks import record_map
from analysis.trigger_map import TRIGGERS, TriggerMap, map_settings
from analysis.triggers import METADATA_FILE, TriggerProgress, TriggerSet, build_trigger_set, shipped_set_folder
from dori_ui.export import build_export
from dori_ui.session import (AppContext, Session, check_setting, check_whole_number, mitigation_settings,
                             record_similarity, session_handle, setting_field, verdict_gallery)
from dori_ui.streaming import check_stop, holding_model, on_model, on_stop, run_and_stop_buttons, run_or_error

VIEW = "trigger_map"
SELECTED_VIEW = "trigger_map_selected"  # the selected trigger's generations, exported on their own
SHIPPED = "shipped set (assets/triggers)"
BUILD = "build a new set here"
COLOURS = ("replication", "set and start")
# Sets built in the app; one folder per model, image and settings, so that a rerun resumes.
BUILT_SETS = RUNS_DIR / "trigger_sets"
TABLE_COLUMNS = ["trigger", "start", "replication (unmitigated, when built)", "final loss", "distance from start",
                 "distance from prompt"]
# Triggers built by default: as many as each shipped set holds, so that the views reading a set show one default.
SET_SIZE = 8
REFERENCE_STYLE = {"memorized prompts": ("#d62728", "star"), "held-out prompts": ("#7f7f7f", "circle-open"),
                   "random starts": ("#bcbd22", "x")}

EXPLANATION = """
**What am I looking at?** Each dot is a *trigger*: a text embedding that Dori's
search found from a random start and that makes the model draw the chosen
training image. The map (UMAP, PCA or t-SNE of whole `[77, d]` embeddings)
puts them beside the embeddings of the memorized captions, of held-out
captions, and of the random embeddings the searches started from. If
memorization were local, the triggers would gather in one small region near the
caption; the paper finds them spread as widely as unrelated prompts. Select a
row of the table to generate that trigger (with the session's mitigation, if
any); pin two to compare.
"""


# A click on a trigger's point (its `customdata` is the trigger's index) selects it as a table row does (the Inside
# view follows the selected trigger). Plotly's click event is only reachable in the page, hence a script.
SELECT_ON_CLICK = """
const pick = (selector, value) => {
  const field = document.querySelector(selector);
  if (!field) return;
  field.value = value;
  field.dispatchEvent(new Event("input", {bubbles: true}));
  field.dispatchEvent(new Event("change", {bubbles: true}));
};
const attach = () => {
  const plot = document.querySelector("#trigger-map-plot .js-plotly-plot");
  if (!plot || !plot.on || plot.dataset.selectOnClick) return;
  plot.dataset.selectOnClick = "yes";
  plot.on("plotly_click", (data) => {
    const trigger = data.points[0].customdata;
    if (trigger === undefined || trigger === null) return;
    pick("#trigger-map-index input", trigger);
    setTimeout(() => document.querySelector("#trigger-map-show").click(), 100);
  });
};
new MutationObserver(attach).observe(document.body, {childList: true, subtree: true});
"""


@dataclass
class MapState:
    """This session's loaded trigger set and its map."""

    trigger_set: TriggerSet
    trigger_map: TriggerMap
    image: int  # index of the target in the model's memorized images
    selected: int | None = None
    shown: tuple[list, str] | None = None  # the selected trigger's gallery and summary, for pinning


@cache
def start_umap_warm_up() -> threading.Thread:
    """Compile UMAP in the background, once per process."""
    thread = threading.Thread(target=warm_up, name="umap-warm-up", daemon=True)
    thread.start()
    return thread


def built_folder(handle: ModelHandle, image: int, count: int, steps: int, eval_seeds: int):
    """Named by the image's caption and what the model is judged against too: another memorized set or replication
    metric builds its own set."""
    model = re.sub(r"[^A-Za-z0-9_.-]+", "-", handle.name).strip("-")
    identity = cache_key(handle.memorized[image].caption, handle.data_settings())
    return BUILT_SETS / model / f"image-{image}-{identity}-n{count}-steps{steps}-eval{eval_seeds}"


def map_figure(trigger_map: TriggerMap, colour: str, selected: int | None) -> go.Figure:
    """The map as a plotly scatter: triggers coloured by replication or start kind, reference sets as symbols."""
    figure = go.Figure()
    triggers = trigger_map.triggers()
    hover = [f"{p.label}<br>replication {p.replication_rate if p.replication_rate is not None else 'not evaluated'}"
             for p in triggers]
    if colour == "replication":
        rates = [p.replication_rate if p.replication_rate is not None else float("nan") for p in triggers]
        figure.add_trace(go.Scatter(
            x=[p.x for p in triggers], y=[p.y for p in triggers], mode="markers", name=TRIGGERS, hovertext=hover,
            customdata=[p.trigger for p in triggers],
            marker=dict(size=10, color=rates, cmin=0, cmax=1, colorscale="Viridis",
                        colorbar=dict(title="replication<br>(unmitigated)", x=1.18))))
    else:
        for kind in dict.fromkeys(p.start_kind for p in triggers):
            chosen = [p for p in triggers if p.start_kind == kind]
            figure.add_trace(go.Scatter(x=[p.x for p in chosen], y=[p.y for p in chosen], mode="markers",
                                        name=f"triggers from {kind} starts", hovertext=[p.label for p in chosen],
                                        customdata=[p.trigger for p in chosen], marker=dict(size=10)))
    for group, (color, symbol) in REFERENCE_STYLE.items():
        chosen = [p for p in trigger_map.points if p.group == group]
        figure.add_trace(go.Scatter(x=[p.x for p in chosen], y=[p.y for p in chosen], mode="markers", name=group,
                                    hovertext=[p.label for p in chosen],
                                    marker=dict(size=9, color=color, symbol=symbol)))
    if selected is not None:
        point = triggers[selected]
        figure.add_trace(go.Scatter(x=[point.x], y=[point.y], mode="markers", name=f"selected: {point.label}",
                                    marker=dict(size=18, color="rgba(0,0,0,0)", line=dict(width=3, color="black"))))
    figure.update_layout(title=f"{len(triggers)} triggers of “{trigger_map.caption}” ({trigger_map.method.upper()})",
                         height=520, margin=dict(t=50, b=40), legend=dict(orientation="h", y=-0.12))
    return figure


def measured_on(trigger_set: TriggerSet, session: Session) -> str:
    """Which model and settings the set's replication rates (table, map colours) were measured with, and whether
    they hold for this session: they were measured unmitigated when the set was built."""
    evaluation = trigger_set.config.get("evaluation") or {}
    seeds, steps = len(evaluation.get("seeds", [])), evaluation.get("steps")
    line = (f"Replication in the table and the map: measured when the set was built, on "
            f"“{trigger_set.config['model']}” without mitigation ({seeds} seeds, {steps} steps each).")
    if session.mask is not None:
        line += (f" **This session has a mitigation** ({session.mask.method}, for “{session.mask.prompt}”): these "
                 "rates are not under it. “Generate trigger” generates under it.")
    return line


def trigger_table(trigger_set: TriggerSet) -> list[list]:
    rows = []
    for trigger in trigger_set.triggers:
        rate = trigger["replication_rate"]
        rows.append([trigger["index"], trigger["start"]["kind"], "not evaluated" if rate is None else f"{rate:.2f}",
                     round(trigger["final_loss"], 4), round(trigger["distance_from_start"], 1),
                     round(trigger["distance_from_prompt"], 1)])
    return rows


def generations(handle: ModelHandle, session: Session, state: MapState, index: int, seeds: list[int]):
    """Trigger `index` generated with `seeds` under the session's mitigation, as a "replicate" run of the trigger's
    embedding: its record (for Export), a gallery and a one-line summary."""
    mitigation, inputs = mitigation_settings(session)
    config = dict(image=state.image, seeds=seeds, mitigation=mitigation)
    record = run_or_error(handle, "replicate", config, {**inputs, "embedding": state.trigger_set.embeddings[index]},
                          session)
    gallery = verdict_gallery(torch.stack([record.images[f"seed{seed}"] for seed in seeds]), seeds,
                              record.metrics["similarities"], record.metrics["replicated"], record_similarity(record))
    with_mitigation = f" with the session's mitigation ({session.mask.method})" if session.mask is not None else ""
    summary = (f"Trigger {index} replicates the training image in {sum(record.metrics['replicated'])} of "
               f"{len(seeds)} seeds{with_mitigation}; final search loss "
               f"{state.trigger_set.triggers[index]['final_loss']:.4f}.")
    return record, gallery, summary


def shipped_set(image: int, caption: str) -> TriggerSet:
    """The shipped trigger set of the memorized image `image` (captioned `caption`); a gr.Error if none ships."""
    folder = shipped_set_folder(image)
    if not (folder / METADATA_FILE).is_file():
        raise gr.Error(f"No shipped trigger set for “{caption}” (looked in {folder}): build one here.")
    return TriggerSet.load(folder)


def built_set(handle: ModelHandle, image: int, trigger_count: object, step_count: object, seed_count: object,
              session: Session, progress) -> TriggerSet | None:
    """A trigger set of the memorized image `image` built (or resumed) in `built_folder`, as the app's model
    computation; None when the session's run was stopped (the finished triggers stay saved)."""
    total = check_whole_number("Triggers to build", trigger_count, 1, MAX_STARTS)
    search_steps = check_setting("Search steps", step_count, DoriSearch, "steps")
    seeds = check_whole_number("Seeds per trigger", seed_count, 1, MAX_SEEDS)

    def report(event: TriggerProgress) -> None:
        check_stop(session)
        done = event.finished * event.step.total + event.step.index + 1
        progress((done, event.total * event.step.total), desc=f"Searching (triggers done: {event.finished})",
                 unit="steps")

    # Batch 2 per start, as the shipped sets (analysis.experiments.trigger_assets): sized for a laptop CPU.
    try:
        with holding_model(session):
            return build_trigger_set(
                handle, built_folder(handle, image, total, search_steps, seeds), handle.memorized[image],
                count=total, search=DoriSearch(steps=search_steps, batch_size=2),
                starts_per_batch=min(total, 8), evaluation_seeds=range(seeds), callback=report)
    except SamplingCancelled:
        return None


def prepare(method_name: str) -> None:
    """UMAP's first use in a process imports and compiles numba code (a minute of CPU on a busy laptop): start
    it when UMAP is picked, not at start-up, so that the app and its tests never pay for it unasked."""
    if method_name == "umap":
        start_umap_warm_up()


def recolour(colour_name: str, state: MapState | None):
    if state is None:
        return gr.skip()
    return map_figure(state.trigger_map, colour_name, state.selected)


def pick_row(selection: gr.SelectData) -> int:
    return selection.index[0]


def loaded(state: MapState | None) -> MapState:
    if state is None:
        raise gr.Error("Load or build a trigger set first.")
    return state


def pin(state: MapState | None):
    """The selected trigger's gallery, titled by its summary, for a pinned gallery."""
    if loaded(state).shown is None:
        raise gr.Error("Select a trigger first (a row of the table).")
    gallery, summary = state.shown
    return gr.update(value=gallery, label=summary)


def build_trigger_map_tab(context: AppContext) -> tuple[gr.State, gr.Number]:
    """The tab's components and events, inside the caller's `gr.Tab`. Returns the session's loaded set
    (a `MapState`, None before one is loaded), which the Paths & masks and Inside views analyse, and the field of
    the selected trigger, which the Inside view follows."""
    handle = context.models.get(context.models.first)
    captions = [m.caption for m in handle.memorized]
    map_state = gr.State(None)
    with gr.Row():
        with gr.Column(scale=3):
            image = gr.Dropdown(captions, value=captions[0] if captions else None, label="Training image",
                                elem_id="trigger-map-image")
            source = gr.Radio([SHIPPED, BUILD], value=SHIPPED, label="Trigger set", elem_id="trigger-map-source")
            with gr.Row():
                method = gr.Radio(list(METHODS), value="pca", label="Map", elem_id="trigger-map-method")
                colour = gr.Radio(list(COLOURS), value="replication", label="Colour triggers by",
                                  elem_id="trigger-map-colour")
        with gr.Column(scale=2):
            with gr.Row():
                count = gr.Number(SET_SIZE, label=f"Triggers to build (1–{MAX_STARTS})", precision=None,
                                  elem_id="trigger-map-count")
                steps = setting_field("Search steps ({range})", DoriSearch, "steps", "trigger-map-steps")
                eval_seeds = gr.Number(2, label=f"Seeds per trigger (1–{MAX_SEEDS})", precision=None,
                                       elem_id="trigger-map-eval-seeds")
            load_button, stop_button = run_and_stop_buttons("Load / build and map", "trigger-map-load", "trigger-map-stop")
    gr.Markdown(EXPLANATION)
    status = gr.Markdown(elem_id="trigger-map-status")
    plot = gr.Plot(label="Trigger map (click a trigger to select it)", elem_id="trigger-map-plot")
    gr.HTML("", js_on_load=SELECT_ON_CLICK, elem_id="trigger-map-click")
    table = gr.Dataframe(headers=TABLE_COLUMNS, label="Triggers (select a row to generate it)", interactive=False,
                         elem_id="trigger-map-table")
    build_export(context, VIEW, "“Load / build and map”")
    with gr.Row():
        index = gr.Number(0, label="Trigger", precision=None, elem_id="trigger-map-index")
        show_seeds = gr.Number(4, label=f"Seeds to generate (1–{MAX_SEEDS})", precision=None,
                               elem_id="trigger-map-seeds")
        show_button = gr.Button("Generate trigger", elem_id="trigger-map-show")
        pin_a = gr.Button("Pin as A", elem_id="trigger-map-pin-a")
        pin_b = gr.Button("Pin as B", elem_id="trigger-map-pin-b")
    selected_summary = gr.Markdown(elem_id="trigger-map-selected-summary")
    selected = gr.Gallery(label="Selected trigger generates", columns=4, format="png", interactive=False,
                          elem_id="trigger-map-selected")
    build_export(context, SELECTED_VIEW, "“Generate trigger”")
    with gr.Row():
        pinned_a = gr.Gallery(label="Pinned A", columns=4, format="png", interactive=False,
                              elem_id="trigger-map-pinned-a")
        pinned_b = gr.Gallery(label="Pinned B", columns=4, format="png", interactive=False,
                              elem_id="trigger-map-pinned-b")

    def load(caption: str | None, source_label: str, method_name: str, colour_name: str, trigger_count: float | None,
             step_count: float | None, seed_count: float | None, session: Session, progress=gr.Progress()):
        model = session_handle(context.models, session)
        names = [m.caption for m in model.memorized]
        if caption not in names:
            raise gr.Error(f"Pick a training image from the list, got {caption!r}.")
        if method_name not in METHODS or colour_name not in COLOURS:
            raise gr.Error(f"Choose a map among {list(METHODS)} and a colouring among {list(COLOURS)}.")
        chosen = names.index(caption)
        if source_label == SHIPPED:
            trigger_set = shipped_set(chosen, caption)
        elif source_label == BUILD:
            trigger_set = built_set(model, chosen, trigger_count, step_count, seed_count, session, progress)
            if trigger_set is None:
                return {status: "Stopped. The triggers finished so far are saved: build again to resume."}
        else:
            raise gr.Error(f"Unknown trigger set source {source_label!r}.")
        progress(None, desc="Projecting")
        try:
            config, inputs = map_settings(model, trigger_set)
        except ValueError as err:
            raise gr.Error(str(err)) from err
        record = run_or_error(model, "trigger_map", dict(config, method=method_name), inputs, session)
        session.records[VIEW] = record
        trigger_map = record_map(record)
        rate = record.metrics["mean_replication_rate"]
        replicated = f"; mean replication {rate:.2f}" if rate is not None else ""
        return {status: f"{len(trigger_set.triggers)} triggers of “{caption}”{replicated}.\n\n"
                        + measured_on(trigger_set, session),
                plot: map_figure(trigger_map, colour_name, None), table: trigger_table(trigger_set),
                map_state: MapState(trigger_set, trigger_map, chosen), context.session: session}

    on_model(load_button.click, load, context,
             inputs=[image, source, method, colour, count, steps, eval_seeds, context.session],
             outputs=[status, plot, table, map_state, context.session], api_name="trigger_map_load")

    method.change(prepare, inputs=method, outputs=None, api_name="trigger_map_prepare")

    on_stop(stop_button, context, status, VIEW)
    colour.change(recolour, inputs=[colour, map_state], outputs=plot, api_name="trigger_map_recolour")

    def show(trigger: float | None, seed_count: float | None, colour_name: str, state: MapState | None,
             session: Session):
        state = loaded(state)
        chosen = check_whole_number("Trigger", trigger, 0, len(state.trigger_set.triggers) - 1)
        seeds = list(range(check_whole_number("Seeds to generate", seed_count, 1, MAX_SEEDS)))
        record, gallery, summary = generations(session_handle(context.models, session), session, state, chosen, seeds)
        session.records[SELECTED_VIEW] = record
        state.selected, state.shown = chosen, (gallery, summary)
        return {selected: gallery, selected_summary: summary, plot: map_figure(state.trigger_map, colour_name, chosen),
                map_state: state}

    show_inputs = [index, show_seeds, colour, map_state, context.session]
    show_outputs = [selected, selected_summary, plot, map_state]
    on_model(table.select(pick_row, inputs=None, outputs=index).then, show, context, inputs=show_inputs,
             outputs=show_outputs)
    on_model(show_button.click, show, context, inputs=show_inputs, outputs=show_outputs, api_name="trigger_map_show")

    pin_a.click(pin, inputs=map_state, outputs=pinned_a, api_name="trigger_map_pin_a")
    pin_b.click(pin, inputs=map_state, outputs=pinned_b, api_name="trigger_map_pin_b")

    def refresh(session: Session) -> dict:
        model = session_handle(context.models, session)
        names = [m.caption for m in model.memorized]
        return {image: gr.update(choices=names, value=names[0] if names else None), map_state: None, status: "",
                plot: None, table: None, selected: [], selected_summary: "", pinned_a: [], pinned_b: [], index: 0}

    context.refresh_on_model_change(VIEW, refresh, [image, map_state, status, plot, table, selected,
                                                    selected_summary, pinned_a, pinned_b, index])
    return map_state, index
