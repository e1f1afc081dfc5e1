"""The Paths & masks view: do the triggers of one image share a path through the UNet, or the units a mask removes?

It analyses the trigger set loaded in the Trigger map view. Activation
discrepancy (`analysis.discrepancy`) compares, per layer, how far apart the
triggers' activations lie with how far apart different memorized prompts' lie.
Mask agreement (`analysis.agreement`) fits NeMo and Wanda once per trigger and
shows their per-layer IoU as heatmaps; a pair where both masks remove nothing
in a layer has no IoU and is marked "∅", never counted as agreement.

Element ids: `paths-layers`, `paths-triggers`, `paths-discrepancy-run`, `paths-discrepancy-plot`,
`paths-discrepancy-summary`, `paths-mask-triggers`, `paths-mask-seeds`, `paths-masks-run`, `paths-masks-status`,
`paths-heatmaps`, `paths-counts`.
"""

from __future__ import annotations

import math

import gradio as gr
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.agreement import IoUMatrix, as_neurons, iou_matrix, localize_each
from analysis.discrepancy import Discrepancy, activation_discrepancy
from analysis.hooks import KINDS
from analysis.localize.nemo import NeMo
from analysis.localize.wanda import Wanda
from analysis.masks import Mask
from analysis.sampling import encode_prompts
from dori_ui import MODEL_CONCURRENCY_ID
from dori_ui.session import AppContext, Session, check_whole_number, session_handle
from dori_ui.trigger_map_tab import MapState

VIEW = "paths"
MAX_TRIGGERS = 64
MAX_MASK_TRIGGERS = 8
MAX_SEEDS = 8
# Localizer settings beyond their defaults (the tests shrink them for the tiny model).
NEMO_PARAMETERS: dict = {}
WANDA_PARAMETERS: dict = {}
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


def discrepancy_figure(triggers: Discrepancy, prompts: Discrepancy) -> go.Figure:
    figure = go.Figure([go.Bar(x=triggers.layers, y=triggers.relative.tolist(), name="triggers of the image"),
                        go.Bar(x=prompts.layers, y=prompts.relative.tolist(), name="different memorized prompts")])
    figure.update_layout(title="Activation discrepancy per layer (mean pairwise distance / mean norm)",
                         barmode="group", xaxis_title="layer", yaxis_title="relative discrepancy", height=380,
                         margin=dict(t=50, b=80))
    return figure


def heatmaps_figure(matrices: dict[str, IoUMatrix]) -> go.Figure:
    """One row of per-layer heatmaps per comparison; ∅ marks pairs where both masks are empty in that layer."""
    layers = list(dict.fromkeys(layer for matrix in matrices.values() for layer in matrix.layers))
    figure = make_subplots(rows=len(matrices), cols=len(layers), horizontal_spacing=0.02, vertical_spacing=0.12,
                           subplot_titles=[f"{name}: {layer}" for name in matrices for layer in layers])
    for row, matrix in enumerate(matrices.values(), start=1):
        for column, layer in enumerate(layers, start=1):
            if layer not in matrix.layers:
                continue
            position = matrix.layers.index(layer)
            values = matrix.values[position].tolist()
            empty = matrix.undefined[position].tolist()
            figure.add_trace(go.Heatmap(
                z=[[None if math.isnan(v) else v for v in line] for line in values], zmin=0, zmax=1,
                colorscale="Viridis", showscale=row == 1 and column == len(layers),
                text=[["∅" if e else f"{v:.2f}" for v, e in zip(line, flags)] for line, flags in zip(values, empty)],
                texttemplate="%{text}", hovertemplate="trigger %{y} vs %{x}: %{text}<extra></extra>"),
                row=row, col=column)
    figure.update_xaxes(showticklabels=False)
    figure.update_yaxes(showticklabels=False, autorange="reversed")
    figure.update_layout(title="Per-layer IoU of the masks of different triggers (∅: both masks empty)",
                         height=260 * len(matrices) + 60, margin=dict(t=80, b=20), font=dict(size=10))
    return figure


def counts_table(nemo: list[Mask], wanda: list[Mask], matrices: dict[str, IoUMatrix]) -> list[list]:
    means = {name: matrix.layer_means() for name, matrix in matrices.items()}
    empty = matrices["NeMo–NeMo"].undefined_shares()
    wanda_neurons = [as_neurons(mask).counts() for mask in wanda]
    rows = []
    for layer in matrices["NeMo–NeMo"].layers:
        nemo_count = sum(mask.counts().get(layer, 0) for mask in nemo) / len(nemo)
        wanda_count = sum(counts.get(layer, 0) for counts in wanda_neurons) / len(wanda)
        rows.append([layer, round(nemo_count, 1), round(wanda_count, 1),
                     *[None if means[name].get(layer) is None else round(means[name][layer], 3)
                       for name in ("NeMo–NeMo", "Wanda–Wanda", "NeMo–Wanda")], f"{empty[layer]:.0%}"])
    return rows


def build_paths_tab(context: AppContext, map_state: gr.State) -> None:
    """The tab's components and events, inside the caller's `gr.Tab`; `map_state` is the Trigger map view's set."""
    gr.Markdown(EXPLANATION)
    with gr.Row():
        layers = gr.Radio(list(KINDS), value="value", label="Layers (value projections or feed-forward)",
                          elem_id="paths-layers")
        n_triggers = gr.Number(16, label=f"Triggers compared (2–{MAX_TRIGGERS})", precision=0,
                               elem_id="paths-triggers")
        discrepancy_button = gr.Button("Compare activation paths", variant="primary",
                                       elem_id="paths-discrepancy-run")
    discrepancy_summary = gr.Markdown(elem_id="paths-discrepancy-summary")
    discrepancy_plot = gr.Plot(label="Activation discrepancy", elem_id="paths-discrepancy-plot")
    with gr.Row():
        mask_triggers = gr.Number(3, label=f"Triggers to localize (2–{MAX_MASK_TRIGGERS}; NeMo takes ~30 s each "
                                  "on a laptop CPU)", precision=0, elem_id="paths-mask-triggers")
        mask_seeds = gr.Number(2, label=f"Localizer seeds (2–{MAX_SEEDS})", precision=0, elem_id="paths-mask-seeds")
        masks_button = gr.Button("Localize each trigger", variant="primary", elem_id="paths-masks-run")
    masks_status = gr.Markdown(elem_id="paths-masks-status")
    heatmaps = gr.Plot(label="Mask agreement", elem_id="paths-heatmaps")
    counts = gr.Dataframe(headers=COUNT_COLUMNS, label="Per layer: units removed and mean IoU", interactive=False,
                          elem_id="paths-counts")

    def compare_paths(kind: str, count: float | None, state: MapState | None, session: Session,
                      progress=gr.Progress()):
        state = loaded(state)
        if kind not in KINDS:
            raise gr.Error(f"Unknown layer kind {kind!r}; choose one of {list(KINDS)}.")
        available = len(state.trigger_set.triggers)
        chosen = check_whole_number("Triggers compared", count, 2, min(MAX_TRIGGERS, available))
        model = session_handle(context.models, session)
        progress(None, desc="First denoising step of every trigger")
        triggers = activation_discrepancy(model, state.trigger_set.embeddings[:chosen].to(model.device), kind)
        captions = [m.caption for m in model.memorized]
        if len(captions) < 2:
            raise gr.Error("The model needs at least 2 memorized captions to compare with.")
        prompts = activation_discrepancy(model, encode_prompts(model, captions), kind)
        summary = (f"{chosen} triggers of “{state.trigger_set.config['caption']}” against {len(captions)} memorized "
                   f"prompts, {kind} layers. Relative discrepancy per layer, triggers / prompts: "
                   + ", ".join(f"{layer} {t:.2f} / {p:.2f}" for layer, t, p in
                               zip(triggers.layers, triggers.relative.tolist(), prompts.relative.tolist())) + ".")
        return summary, discrepancy_figure(triggers, prompts)

    discrepancy_button.click(compare_paths, inputs=[layers, n_triggers, map_state, context.session],
                             outputs=[discrepancy_summary, discrepancy_plot], api_name="paths_discrepancy",
                             concurrency_id=MODEL_CONCURRENCY_ID, concurrency_limit=1)

    def compare_masks(count: float | None, seed_count: float | None, state: MapState | None, session: Session,
                      progress=gr.Progress()):
        state = loaded(state)
        available = len(state.trigger_set.triggers)
        chosen = check_whole_number("Triggers to localize", count, 2, min(MAX_MASK_TRIGGERS, available))
        seeds = list(range(check_whole_number("Localizer seeds", seed_count, 2, MAX_SEEDS)))
        model = session_handle(context.models, session)
        embeddings = state.trigger_set.embeddings[:chosen].to(model.device)
        progress(None, desc=f"NeMo on {chosen} triggers")
        nemo_progress = lambda message: progress(None, desc=f"NeMo: {message}")  # noqa: E731
        try:
            nemo = localize_each(NeMo(**NEMO_PARAMETERS, progress=nemo_progress), model, embeddings, seeds=seeds)
            # Wanda on NeMo's layers, so that the two can be compared neuron by neuron.
            progress(None, desc=f"Wanda on {chosen} triggers")
            wanda = localize_each(Wanda(**{"layers": list(nemo[0].removed), **WANDA_PARAMETERS}), model, embeddings,
                                  seeds=seeds)
        except ValueError as err:
            raise gr.Error(str(err)) from err
        matrices = {"NeMo–NeMo": iou_matrix(nemo), "Wanda–Wanda": iou_matrix(wanda, level="neurons"),
                    "NeMo–Wanda": iou_matrix(nemo, wanda, level="neurons")}
        status = (f"NeMo and Wanda fitted on {chosen} triggers of “{state.trigger_set.config['caption']}” "
                  f"with {len(seeds)} seeds each.")
        return status, heatmaps_figure(matrices), counts_table(nemo, wanda, matrices)

    masks_button.click(compare_masks, inputs=[mask_triggers, mask_seeds, map_state, context.session],
                       outputs=[masks_status, heatmaps, counts], api_name="paths_masks",
                       concurrency_id=MODEL_CONCURRENCY_ID, concurrency_limit=1)

    def refresh(session: Session):
        return "", None, "", None, None

    context.on_model_change[VIEW] = (refresh, [discrepancy_summary, discrepancy_plot, masks_status, heatmaps, counts])
