"""The Paths & masks view: do the triggers of one image share a path through the UNet, or the units a mask removes?

It analyses the trigger set loaded in the Trigger map view. Activation
discrepancy (`analysis.discrepancy`) compares, per layer, how far apart the
triggers' activations lie with how far apart different memorized prompts' lie.
Mask agreement (`analysis.agreement`) fits NeMo and Wanda once per trigger and
shows their per-layer IoU as heatmaps; a pair where both masks remove nothing
in a layer has no IoU and is marked "∅", never counted as agreement.

Each comparison is one `run_task` ("discrepancy", "agreement") on the first
triggers of the set, and has its own export: the view `paths` holds the last
discrepancy run, `paths_masks` the last mask agreement run.

Element ids: `paths-layers`, `paths-triggers`, `paths-discrepancy-run`, `paths-discrepancy-plot`,
`paths-discrepancy-summary`, `paths-export`, `paths-export-file`, `paths-mask-triggers`, `paths-mask-seeds`,
`paths-masks-run`, `paths-masks-stop`, `paths-masks-status`, `paths-heatmaps`, `paths-counts`, `paths_masks-export`,
`paths_masks-export-file`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import gradio as gr
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.agreement import STAGE as FITS
from analysis.export import RunRecord
from analysis.hooks import KINDS
from analysis.progress import TaskProgress
from analysis.limits import MAX_LOCALIZED_TRIGGERS, MAX_SEEDS, MAX_STARTS
from dori_ui.export import build_export
from dori_ui.session import AppContext, Session, check_whole_number, session_handle
from dori_ui.streaming import on_model, on_stop, progress_of, report_to, run_and_stop_buttons, run_or_error
from dori_ui.trigger_map_tab import SET_SIZE, MapState

VIEW = "paths"
MASKS_VIEW = "paths_masks"
# Localizer settings beyond their defaults (the tests shrink them for the tiny model).
NEMO_PARAMETERS: dict = {}
WANDA_PARAMETERS: dict = {}
# The agreement record's comparisons, as the heatmaps and the table name them.
COMPARISONS = {"nemo_nemo": "NeMo–NeMo", "wanda_wanda": "Wanda–Wanda", "nemo_wanda": "NeMo–Wanda"}
COUNT_COLUMNS = ["layer", "NeMo neurons (mean per trigger)", "Wanda neurons touched (mean per trigger)",
                 "NeMo–NeMo mean IoU", "Wanda–Wanda mean IoU", "NeMo–Wanda mean IoU", "NeMo pairs empty in both"]

EXPLANATION = """
**What am I looking at?** If memorization were *local*, every trigger of an
image would run through the same few neurons, and pruning them would end it.
The bars compare, per layer, the spread of the triggers' activations at the
first denoising step (mean pairwise distance over mean norm) with the spread
between *different* memorized prompts: bars of equal height mean the triggers
take as different paths as unrelated prompts do. The heatmaps show, per layer,
how much the masks NeMo (neurons) and Wanda (weights, compared as the neurons
they touch) find for different triggers overlap (IoU; ∅: both remove nothing).
"""


def loaded(state: MapState | None) -> MapState:
    if state is None:
        raise gr.Error("Load or build a trigger set in the Trigger map view first.")
    return state


def discrepancy_figure(record: RunRecord) -> go.Figure:
    layers = [row["layer"] for row in record.table]
    figure = go.Figure([go.Bar(x=layers, y=[row["triggers_relative"] for row in record.table],
                               name="triggers of the image"),
                        go.Bar(x=layers, y=[row["prompts_relative"] for row in record.table],
                               name="different memorized prompts")])
    figure.update_layout(title="Activation discrepancy per layer (mean pairwise distance / mean norm)",
                         barmode="group", xaxis_title="layer", yaxis_title="relative discrepancy", height=380,
                         margin=dict(t=50, b=80))
    return figure


def discrepancy_summary_text(record: RunRecord) -> str:
    config = record.config
    return (f"{len(record.inputs()['triggers'])} triggers of “{config['prompt']}” against {len(config['prompts'])} "
            f"memorized prompts, {config['layers']} layers. Relative discrepancy per layer, triggers / prompts: "
            + ", ".join(f"{row['layer']} {row['triggers_relative']:.2f} / {row['prompts_relative']:.2f}"
                        for row in record.table) + ".")


def heatmaps_figure(record: RunRecord) -> go.Figure:
    """One row of per-layer heatmaps per comparison; ∅ marks pairs where both masks are empty in that layer."""
    layers = [row["layer"] for row in record.table]
    figure = make_subplots(rows=len(COMPARISONS), cols=len(layers), horizontal_spacing=0.02, vertical_spacing=0.12,
                           subplot_titles=[f"{title}: {layer}" for title in COMPARISONS.values() for layer in layers])
    for row, name in enumerate(COMPARISONS, start=1):
        compared = list(record.metrics[name])  # the layers of this comparison, in the order of its IoU matrix
        matrices = record.tensors[f"iou.{name}"].tolist()
        for column, layer in enumerate(layers, start=1):
            if layer not in compared:
                continue
            values = matrices[compared.index(layer)]
            figure.add_trace(go.Heatmap(
                z=[[None if math.isnan(v) else v for v in line] for line in values], zmin=0, zmax=1,
                colorscale="Viridis", showscale=row == 1 and column == len(layers), colorbar=dict(title="IoU"),
                text=[["∅" if math.isnan(v) else f"{v:.2f}" for v in line] for line in values],
                texttemplate="%{text}", hovertemplate="trigger %{y} vs %{x}: %{text}<extra></extra>"),
                row=row, col=column)
    figure.update_xaxes(showticklabels=False)
    figure.update_yaxes(showticklabels=False, autorange="reversed")
    figure.update_xaxes(title_text="trigger", row=len(COMPARISONS))
    figure.update_yaxes(title_text="trigger", col=1)
    figure.update_layout(title="Per-layer IoU of the masks of different triggers (∅: both masks empty)",
                         height=260 * len(COMPARISONS) + 60, margin=dict(t=80, b=20), font=dict(size=10))
    return figure


def counts_table(record: RunRecord) -> list[list]:
    return [[row["layer"], round(row["nemo_neurons"], 1), round(row["wanda_neurons"], 1),
             *[None if row[f"{name}_mean_iou"] is None else round(row[f"{name}_mean_iou"], 3) for name in COMPARISONS],
             f"{row['nemo_nemo_undefined']:.0%}"] for row in record.table]


def fits_progress(progress) -> Callable[[object], None]:
    """A `run_task` callback for "agreement": the bar counts localizer fits over all triggers (NeMo's and Wanda's),
    and names the current fit's own step beside it, which would otherwise replace the total."""
    fit = {"count": (0, None), "name": ""}

    def callback(event: object) -> None:
        if isinstance(event, TaskProgress) and event.stage == FITS:
            fit.update(count=(event.done, event.total), name=event.message)
            progress(fit["count"], desc=f"Localizer fits: {event.message}".rstrip(": "), unit="fits")
        elif (shown := progress_of(event)) is not None:
            (done, total), description, _ = shown
            progress(fit["count"], desc=f"{fit['name']} · {description} {done}/{total or '?'}", unit="fits")

    return callback


def build_paths_tab(context: AppContext, map_state: gr.State) -> None:
    """The tab's components and events, inside the caller's `gr.Tab`; `map_state` is the Trigger map view's set."""
    gr.Markdown(EXPLANATION)
    with gr.Row():
        layers = gr.Radio(list(KINDS), value="value", label="Layers (value projections or feed-forward)",
                          elem_id="paths-layers")
        n_triggers = gr.Number(SET_SIZE, label=f"Triggers compared (2–{MAX_STARTS}, at most the set's)",
                               precision=None, elem_id="paths-triggers")
        discrepancy_button = gr.Button("Compare activation paths", variant="primary",
                                       elem_id="paths-discrepancy-run")
    discrepancy_summary = gr.Markdown(elem_id="paths-discrepancy-summary")
    discrepancy_plot = gr.Plot(label="Activation discrepancy", elem_id="paths-discrepancy-plot")
    build_export(context, VIEW, "“Compare activation paths”")
    with gr.Row():
        mask_triggers = gr.Number(3, label=f"Triggers to localize (2–{MAX_LOCALIZED_TRIGGERS}; NeMo takes ~30 s each "
                                  "on a laptop CPU)", precision=None, elem_id="paths-mask-triggers")
        mask_seeds = gr.Number(2, label=f"Localizer seeds (2–{MAX_SEEDS})", precision=None, elem_id="paths-mask-seeds")
        masks_button, masks_stop = run_and_stop_buttons("Localize each trigger", "paths-masks-run",
                                                        "paths-masks-stop")
    masks_status = gr.Markdown(elem_id="paths-masks-status")
    heatmaps = gr.Plot(label="Mask agreement", elem_id="paths-heatmaps")
    counts = gr.Dataframe(headers=COUNT_COLUMNS, label="Per layer: units removed and mean IoU", interactive=False,
                          elem_id="paths-counts")
    build_export(context, MASKS_VIEW, "“Localize each trigger”")

    def compare_paths(kind: str, count: float | None, state: MapState | None, session: Session,
                      progress=gr.Progress()):
        state = loaded(state)
        available = len(state.trigger_set.triggers)
        chosen = check_whole_number("Triggers compared", count, 2, min(MAX_STARTS, available))
        model = session_handle(context.models, session)
        progress(None, desc="First denoising step of every trigger")
        record = run_or_error(model, "discrepancy", dict(image=state.image, layers=kind),
                              {"triggers": state.trigger_set.embeddings[:chosen]}, session, report_to(progress))
        session.records[VIEW] = record
        return {discrepancy_summary: discrepancy_summary_text(record), discrepancy_plot: discrepancy_figure(record),
                context.session: session}

    on_model(discrepancy_button.click, compare_paths, context, inputs=[layers, n_triggers, map_state, context.session],
             outputs=[discrepancy_summary, discrepancy_plot, context.session], api_name="paths_discrepancy")

    def compare_masks(count: float | None, seed_count: float | None, state: MapState | None, session: Session,
                      progress=gr.Progress()):
        state = loaded(state)
        available = len(state.trigger_set.triggers)
        chosen = check_whole_number("Triggers to localize", count, 2, min(MAX_LOCALIZED_TRIGGERS, available))
        seeds = list(range(check_whole_number("Localizer seeds", seed_count, 2, MAX_SEEDS)))
        model = session_handle(context.models, session)
        config = dict(image=state.image, seeds=seeds, nemo=NEMO_PARAMETERS, wanda=WANDA_PARAMETERS)
        record = run_or_error(model, "agreement", config, {"triggers": state.trigger_set.embeddings[:chosen]},
                              session, fits_progress(progress))
        session.records[MASKS_VIEW] = record
        return {masks_status: f"NeMo and Wanda fitted on {chosen} triggers of “{record.config['prompt']}” "
                              f"with {len(seeds)} seeds each.",
                heatmaps: heatmaps_figure(record), counts: counts_table(record), context.session: session}

    on_model(masks_button.click, compare_masks, context, inputs=[mask_triggers, mask_seeds, map_state, context.session],
             outputs=[masks_status, heatmaps, counts, context.session], api_name="paths_masks")
    on_stop(masks_stop, context, masks_status, MASKS_VIEW)

    def refresh(session: Session) -> dict:
        return {discrepancy_summary: "", discrepancy_plot: None, masks_status: "", heatmaps: None, counts: None}

    context.refresh_on_model_change(VIEW, refresh, [discrepancy_summary, discrepancy_plot, masks_status, heatmaps,
                                                    counts])
