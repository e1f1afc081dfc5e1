"""The Perturb view: Dori's adversarial embedding search and the random perturbation sweep, on the session's model.

When Mitigate has set a mask, both run on the mitigated model: the search shows
whether the memorized image comes back. The held-out control searches toward
an image the model never saw (a rendering of a held-out caption of the demo
data), which should not come out in the same number of steps.

Element ids: `perturb-target`, `perturb-start`, `perturb-other-prompt`, `perturb-random-seed`, `perturb-upload`,
`perturb-steps`, `perturb-lr`, `perturb-batch`, `perturb-eval-seeds`, `perturb-generation-steps`,
`perturb-preview-every`, `perturb-run`,
`perturb-stop`, `perturb-status`, `perturb-loss`, `perturb-preview`, `perturb-target-image`, `perturb-after`,
`perturb-distances`, `perturb-export`, `perturb-export-file`; sweep: `sweep-radii`, `sweep-directions`,
`sweep-seeds`, `sweep-model`, `sweep-run`, `sweep-stop`, `sweep-plot`, `sweep-summary`, `sweep-export`,
`sweep-export-file`.
"""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
import plotly.graph_objects as go
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from analysis.dori import DoriPreview, DoriSearch, DoriStep
from analysis.dori_tasks import AttackSettings
from analysis.export import RunRecord
from analysis.limits import MAX_SEED
from analysis.images import to_display
from analysis.model import ModelHandle
from analysis.replication_tasks import SweepSettings
from analysis.settings import Sampling
from dori_ui.export import build_export
from dori_ui.session import (AppContext, Session, check_number, check_prompt, check_setting, check_whole_number,
                             mitigation_settings, setting_field, record_similarity, session_handle, verdict_gallery)
from dori_ui.streaming import (Stopped, on_model, on_stop, report_to, run_and_stop_buttons, run_or_error,
                               stream_task)
from dori_ui.trigger_map_tab import SELECTED_VIEW

VIEW = "perturb"
SWEEP_VIEW = "sweep"
CONTROL = "held-out control: "  # prefix of the targets that are the model's control images
STARTS = {"the prompt's own embedding": "prompt", "random embedding": "random", "another prompt": "other",
          "uploaded embedding (.safetensors)": "upload", "the Trigger map's selected trigger": "selected"}
MAX_RADII = 12
# What the sweep runs on: with a mitigation on, every radius may fail, the unperturbed prompt too (radius 0).
SESSION_MODEL = "the session's model, with its mitigation if any"
UNMITIGATED = "the unmitigated model"
# Search steps between previews: each generates 2 seeds (about 1 s on the bundled model, on this project's CPU),
# and a 50-step search then shows one halfway; the finished run generates the trigger itself.
PREVIEW_EVERY = 25
# Streamed plots are sent at most this often; every step would flood a slow browser.
STREAM_INTERVAL_S = 0.5

EXPLANATION = """
**What am I looking at?** Dori (Kowalczuk et al. 2025) optimises a text
embedding, not words, so that the model denoises toward the training image.
The loss curve falls as the search finds a trigger; the previews show what the
current embedding generates. Against a mitigated model (see the header) the
image usually comes back within 50 steps: the mitigation removed one route to
the memory, not the memory. The distance plot shows how far each token moved
from the start and from the prompt's own embedding. The *held-out control*
targets an image the model never saw: the search should fail there.
"""

SWEEP_EXPLANATION = """
**Random perturbation sweep.** The prompt's embedding is moved by a fixed
distance (radius) in random directions and generated again: how far can it
move and still replicate? Dori's triggers lie much further away than random
perturbations survive, in directions a random sweep would not find.
"""


def target_choices(handle: ModelHandle) -> list[str]:
    """The memorized images' captions, then the model's control images (`ModelHandle.controls`)."""
    return [m.caption for m in handle.memorized] + [CONTROL + control.caption for control in handle.controls]


def target_settings(handle: ModelHandle, label: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The `image`/`prompt` settings and inputs of a target chosen from `target_choices`: a control image is the
    `target` input, compared with the generations of its caption."""
    choices = target_choices(handle)
    if label not in choices:
        raise gr.Error(f"Pick a target image from the list, got {label!r}.")
    index = choices.index(label)
    if index < len(handle.memorized):
        return dict(image=index, prompt=label), {}
    control = handle.controls[index - len(handle.memorized)]
    return dict(image=None, prompt=control.caption), {"target": control.image}


def read_embedding(path: str | None, handle: ModelHandle) -> torch.Tensor:
    """The one `[77, d]` (or `[1, 77, d]`) tensor of an uploaded .safetensors file; a gr.Error for anything else."""
    if not path:
        raise gr.Error("Upload a .safetensors file holding one embedding, or pick another start.")
    name = Path(path).name
    if not name.endswith(".safetensors"):
        raise gr.Error(f"{name} is not a .safetensors file: upload an embedding saved with safetensors.")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise gr.Error(f"{name} could not be read as safetensors: {err}") from err
    if len(tensors) != 1:
        raise gr.Error(f"{name} holds {len(tensors)} tensors ({', '.join(tensors)}); upload one embedding.")
    embedding = next(iter(tensors.values()))
    embedding = embedding[0] if embedding.ndim == 3 and embedding.shape[0] == 1 else embedding
    expected = (handle.tokenizer.model_max_length, handle.unet.config.cross_attention_dim)
    if tuple(embedding.shape) != expected:
        raise gr.Error(f"{name}: an embedding for this model has shape {list(expected)}, got {list(embedding.shape)}.")
    if not embedding.is_floating_point() or not torch.isfinite(embedding).all():
        raise gr.Error(f"{name}: the embedding holds NaN or infinite values (or is not floating point).")
    return embedding.float()


def selected_trigger(handle: ModelHandle, session: Session) -> torch.Tensor:
    """The embedding of the trigger last selected in the Trigger map view (what its "Generate trigger" ran)."""
    record = session.records.get(SELECTED_VIEW)
    if record is None:
        raise gr.Error("Select a trigger in the Trigger map view first (click its point or its row).")
    if record.model != handle.name:
        raise gr.Error(f"The selected trigger was generated on {record.model!r}, not this session's model: select "
                       "one again in the Trigger map view.")
    return record.inputs()["embedding"]


def start_setting(handle: ModelHandle, kind: str, seed: object, other_text: object, upload_path: str | None,
                  session: Session) -> tuple[dict, dict[str, torch.Tensor]]:
    """The search's start (an "attack" `starts` entry) of a `STARTS` kind, and the inputs it names."""
    if kind == "random":
        return dict(kind="random", seed=check_whole_number("Random start seed", seed, 0, MAX_SEED)), {}
    if kind == "other":
        return dict(kind="prompt", text=check_prompt(handle, other_text)), {}
    if kind == "upload":
        return dict(kind="embedding", input="start"), {"start": read_embedding(upload_path, handle)}
    if kind == "selected":
        return dict(kind="embedding", input="start"), {"start": selected_trigger(handle, session)}
    return dict(kind="prompt"), {}


def loss_figure(losses: list[float], total: int) -> go.Figure:
    figure = go.Figure(go.Scatter(x=list(range(1, len(losses) + 1)), y=losses, mode="lines"))
    figure.update_layout(title=f"Denoising loss toward the image (step {len(losses)} of {total})",
                         xaxis_title="search step", yaxis_title="loss", xaxis_range=[1, max(total, 2)], height=320,
                         margin=dict(t=50, b=40))
    return figure


def preview_gallery(preview: DoriPreview, handle: ModelHandle) -> list:
    """What the search's current embedding generates, each with its step and similarity to the target."""
    captions = [f"step {preview.step} · {handle.replication_metric.label()} {similarity:.2f}"
                for similarity in preview.similarities]
    return list(zip(to_display(preview.images), captions))


def distances_figure(record: RunRecord) -> go.Figure:
    """Per-token L2 distance of the trigger from its start and from the prompt's embedding (the record's)."""
    from_start = record.tensors["token_distance_from_start"][0]
    from_prompt = record.tensors["token_distance_from_prompt"][0]
    positions = list(range(len(from_start)))
    figure = go.Figure([go.Bar(x=positions, y=from_start.tolist(), name="from the start"),
                        go.Scatter(x=positions, y=from_prompt.tolist(), name="from the prompt's embedding",
                                   mode="lines")])
    figure.update_layout(title="Per-token L2 distance of the trigger (token 0 is the start marker)",
                         xaxis_title="token position", yaxis_title="‖y_adv − y‖₂", height=320,
                         margin=dict(t=50, b=40))
    return figure


def trigger_gallery(record: RunRecord) -> list:
    """The trigger's generations, each with its similarity to the target and the verdict."""
    seeds = record.config["evaluation_seeds"]
    images = torch.stack([record.images[f"start0_seed{seed}"] for seed in seeds])
    return verdict_gallery(images, seeds, record.metrics["similarities"][0], record.metrics["replicated"][0],
                           record_similarity(record))


def attack_summary(record: RunRecord) -> str:
    metrics, config = record.metrics, record.config
    seeds = len(config["evaluation_seeds"])
    against = "the mitigated model" if config["mitigation"] is not None else "the model as it is"
    target = "the training image" if config["image"] is not None else "the held-out control image"
    replicated, at_start = round(metrics["rate"][0] * seeds), round(metrics["rate_before"][0] * seeds)
    return (f"Dori search of {config['search']['steps']} steps against {against}: the trigger replicates {target} "
            f"in {replicated} of {seeds} seeds (start: {at_start} of {seeds}); mean {record_similarity(record)} "
            f"{metrics['mean_similarity'][0]:.2f}, final loss {metrics['final_loss'][0]:.4f}, distance from the start "
            f"{metrics['distance_from_start'][0]:.1f}.")


def sweep_model(record: RunRecord, session: Session) -> str:
    """Which model a sweep ran on, as its plot and summary name it."""
    name = session.model_labels.get(record.model, record.model)
    if record.config["mitigation"] is None:
        return f"{name}, unmitigated"
    return f"{name} with the session's mitigation ({session.mask.method}, for “{session.mask.prompt}”)"


def sweep_figure(record: RunRecord, model: str) -> go.Figure:
    radii = [row["radius"] for row in record.table]
    similarities = [row["mean_similarity"] for row in record.table]
    figure = go.Figure([go.Scatter(x=radii, y=[row["rate"] for row in record.table], name="replication rate",
                                   mode="lines+markers"),
                        go.Scatter(x=radii, y=similarities, name=f"mean {record_similarity(record)}",
                                   mode="lines+markers", line=dict(dash="dot"))])
    # Rates lie in [0, 1]; a similarity such as pixel correlation may fall below 0, and must stay on the plot.
    low, high = min(0.0, *similarities), max(1.0, *similarities)
    margin = 0.05 * (high - low)
    figure.update_layout(title=f"Replication vs perturbation radius (‖y‖ = {record.metrics['embedding_norm']:.1f})"
                               f"<br><sup>on {model}</sup>",
                         xaxis_title="radius (L2 distance from the prompt's embedding)",
                         yaxis_title=f"rate / {record_similarity(record)}",
                         yaxis_range=[low - margin, high + margin], height=360, margin=dict(t=70, b=40))
    return figure


def parse_radii(text: str | None) -> list[float]:
    try:
        radii = [float(part) for part in (text or "").replace(";", ",").split(",") if part.strip()]
    except ValueError as err:
        raise gr.Error(f"Radii must be numbers separated by commas, got {text!r}.") from err
    if not radii or len(radii) > MAX_RADII or any(not 0 <= r < 1e4 for r in radii):
        raise gr.Error(f"Give 1 to {MAX_RADII} radii from 0 to 10000, separated by commas; got {text!r}.")
    return radii


def build_perturb_tab(context: AppContext) -> None:
    """The tab's components and events, inside the caller's `gr.Tab`."""
    handle = context.models.get(context.models.first)
    targets = target_choices(handle)
    with gr.Row():
        with gr.Column(scale=3):
            target = gr.Dropdown(targets, value=targets[0] if targets else None,
                                 label="Target image (a training image, or a held-out control)",
                                 elem_id="perturb-target")
            start = gr.Radio(list(STARTS), value="random embedding", label="Start the search from",
                             elem_id="perturb-start")
            with gr.Row():
                other_prompt = gr.Textbox(label="Other prompt (start 'another prompt')",
                                          value=handle.held_out_prompts[0] if handle.held_out_prompts else "",
                                          elem_id="perturb-other-prompt")
                random_seed = gr.Number(0, label="Random start seed", precision=None, elem_id="perturb-random-seed")
            upload = gr.File(label="Start embedding [77, d] (.safetensors)", file_types=[".safetensors"],
                             elem_id="perturb-upload")
        with gr.Column(scale=2):
            with gr.Row():
                steps = setting_field("Search steps ({range})", DoriSearch, "steps", "perturb-steps")
                lr = setting_field("Learning rate (Adam)", DoriSearch, "lr", "perturb-lr")
            with gr.Row():
                batch = setting_field("Batch (ε, t pairs per step, {range})", DoriSearch, "batch_size",
                                      "perturb-batch")
                eval_seeds = setting_field("Seeds to generate ({range})", AttackSettings, "evaluation_seeds",
                                           "perturb-eval-seeds")
            with gr.Row():
                generation_steps = setting_field("Generation steps ({range})", Sampling, "steps",
                                                 "perturb-generation-steps", handle.default_steps)
                preview_every = gr.Number(PREVIEW_EVERY, label="Preview every n search steps (0: never)",
                                          precision=None, elem_id="perturb-preview-every")
            run_button, stop_button = run_and_stop_buttons("Run Dori", "perturb-run", "perturb-stop")
    gr.Markdown(EXPLANATION)
    status = gr.Markdown(elem_id="perturb-status")
    with gr.Row():
        loss_plot = gr.Plot(label="Loss", elem_id="perturb-loss")
        preview = gr.Gallery(label="Current embedding generates", columns=2, format="png", interactive=False,
                             height="auto", elem_id="perturb-preview")
    with gr.Row():
        target_view = gr.Gallery(label="Target", columns=1, format="png", interactive=False, height="auto",
                                 scale=1, elem_id="perturb-target-image")
        after = gr.Gallery(label="The trigger generates", columns=4, format="png", interactive=False,
                           height="auto", scale=4, elem_id="perturb-after")
    distances = gr.Plot(label="Distances", elem_id="perturb-distances")
    build_export(context, VIEW)

    def attack(target_label: str | None, start_label: str, other_text: str, seed: float | None, upload_path,
               step_count: float | None, rate: float | None, batch_size: float | None, eval_count: float | None,
               sampling_steps: float | None, every: float | None, state: Session, progress=gr.Progress()):
        model = session_handle(context.models, state)
        target_config, target_inputs = target_settings(model, target_label)
        if start_label not in STARTS:
            raise gr.Error(f"Unknown start {start_label!r}; choose one of {list(STARTS)}.")
        total = check_setting("Search steps", step_count, DoriSearch, "steps")
        search = dict(steps=total, lr=check_number("The learning rate", rate, 0, 10, low_open=True),
                      batch_size=check_setting("Batch", batch_size, DoriSearch, "batch_size"))
        seeds = list(range(check_setting("Seeds to generate", eval_count, AttackSettings, "evaluation_seeds")))
        every = check_setting("Preview every", every, AttackSettings, "preview_every")
        sampling_steps = check_setting("Generation steps", sampling_steps, Sampling, "steps")
        mitigation, inputs = mitigation_settings(state)
        start_spec, start_inputs = start_setting(model, STARTS[start_label], seed, other_text, upload_path, state)
        config, inputs = dict(target_config), {**inputs, **target_inputs, **start_inputs}
        config.update(starts=[start_spec], search=search, evaluation_seeds=seeds, steps=sampling_steps,
                      mitigation=mitigation, preview_every=every, preview_seeds=min(2, len(seeds)))

        # A stopped or failed run leaves nothing to export, not the run before it.
        state.records.pop(VIEW, None)
        losses: list[float] = []
        sent = 0.0
        report = report_to(progress)
        yield {status: "Starting the search…", loss_plot: None, preview: [], target_view: [], after: [],
               distances: None, context.session: state}
        for event in stream_task(model, "attack", config, inputs, state):
            report(event)
            if isinstance(event, DoriStep):
                losses.append(event.loss[0].item())
                if time.monotonic() - sent < STREAM_INTERVAL_S and event.index + 1 != event.total:
                    continue
                sent = time.monotonic()
                yield {status: f"Step {event.index + 1} of {event.total}: loss {losses[-1]:.4f}, distance from the "
                               f"start {event.distance[0].item():.1f}",
                       loss_plot: loss_figure(losses, total), context.session: state}
            elif isinstance(event, DoriPreview):
                yield {preview: preview_gallery(event, model), context.session: state}
            elif isinstance(event, Stopped):
                yield {status: f"Stopped after step {len(losses)} of {total}.", loss_plot: loss_figure(losses, total),
                       context.session: state}
            elif isinstance(event, RunRecord):
                state.records[VIEW] = event
                yield {status: attack_summary(event), loss_plot: loss_figure(losses, total),
                       target_view: [(to_display(event.images["target"][None])[0], "target")],
                       after: trigger_gallery(event), distances: distances_figure(event), context.session: state}

    on_model(run_button.click, attack, context,
             inputs=[target, start, other_prompt, random_seed, upload, steps, lr, batch, eval_seeds, generation_steps,
                     preview_every, context.session],
             outputs=[status, loss_plot, preview, target_view, after, distances, context.session], api_name="perturb",
             show_progress_on=status)  # the loss plot and previews stream: no overlay over them

    on_stop(stop_button, context, status, VIEW)

    with gr.Accordion("Random perturbation sweep", open=True):
        gr.Markdown(SWEEP_EXPLANATION)
        with gr.Row():
            radii = gr.Textbox("0, 5, 10, 20, 40", label="Radii (L2 distances, comma-separated)",
                               elem_id="sweep-radii")
            directions = setting_field("Directions ({range})", SweepSettings, "directions", "sweep-directions")
            sweep_seeds = setting_field("Seeds per direction ({range})", SweepSettings, "seeds", "sweep-seeds", 2)
            sweep_on = gr.Radio([SESSION_MODEL, UNMITIGATED], value=SESSION_MODEL, label="Run on",
                                elem_id="sweep-model")
            sweep_button, sweep_stop = run_and_stop_buttons("Run sweep", "sweep-run", "sweep-stop")
        sweep_plot = gr.Plot(label="Replication vs radius", elem_id="sweep-plot")
        sweep_summary = gr.Markdown(elem_id="sweep-summary")
        build_export(context, SWEEP_VIEW)

    def sweep(target_label: str | None, radii_text: str, direction_count: float | None, seed_count: float | None,
              sampling_steps: float | None, run_on: str, state: Session, progress=gr.Progress()):
        model = session_handle(context.models, state)
        target_config, target_inputs = target_settings(model, target_label)
        if run_on not in (SESSION_MODEL, UNMITIGATED):
            raise gr.Error(f"Run the sweep on {SESSION_MODEL!r} or {UNMITIGATED!r}, got {run_on!r}.")
        mitigation, inputs = mitigation_settings(state) if run_on == SESSION_MODEL else (None, {})
        config = dict(**target_config, radii=parse_radii(radii_text),
                      directions=check_setting("Directions", direction_count, SweepSettings, "directions"),
                      seeds=list(range(check_setting("Seeds per direction", seed_count, SweepSettings, "seeds"))),
                      steps=check_setting("Generation steps", sampling_steps, Sampling, "steps"), mitigation=mitigation)
        inputs.update(target_inputs)
        record = run_or_error(model, "sweep", config, inputs, state, report_to(progress))
        state.records[SWEEP_VIEW] = record
        rates = ", ".join(f"{row['radius']:g}: {row['rate']:.0%}" for row in record.table)
        on = sweep_model(record, state)
        return {sweep_plot: sweep_figure(record, on), sweep_summary: f"On {on}: replication rate per radius: {rates}.",
                context.session: state}

    on_model(sweep_button.click, sweep, context,
             inputs=[target, radii, directions, sweep_seeds, generation_steps, sweep_on, context.session],
             outputs=[sweep_plot, sweep_summary, context.session], api_name="sweep")
    on_stop(sweep_stop, context, sweep_summary, SWEEP_VIEW)

    def refresh(state: Session) -> dict:
        model = session_handle(context.models, state)
        names = target_choices(model)
        return {target: gr.update(choices=names, value=names[0] if names else None),
                generation_steps: model.default_steps, status: "", loss_plot: None, preview: [], target_view: [],
                after: [], distances: None, sweep_plot: None, sweep_summary: ""}

    context.refresh_on_model_change(VIEW, refresh, [target, generation_steps, status, loss_plot, preview,
                                                    target_view, after, distances, sweep_plot, sweep_summary])
