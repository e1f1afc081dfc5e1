"""The Attribution view: which words of a prompt drive Wen et al.'s memorization signal.

Element ids: `attribution-prompt`, `attribution-method`, `attribution-seeds`, `attribution-ig-steps`,
`attribution-run`, `attribution-words`, `attribution-summary`, `attribution-plot`, `attribution-export`,
`attribution-export-file`.
"""

from __future__ import annotations

import gradio as gr
import plotly.graph_objects as go

from analysis.attribution import IntegratedGradients
from analysis.attribution.common import OBJECTIVE_SEEDS
from analysis.export import RunRecord
from analysis.limits import MAX_DENOISING_STEPS as MAX_STEPS
from analysis.limits import MAX_SEEDS
from dori_ui.export import build_export
from dori_ui.session import AppContext, Session, check_prompt, check_whole_number, session_handle
from dori_ui.streaming import on_model, run_or_error

VIEW = "attribution"
METHODS = {"Gradient norm (Wen et al.)": "gradient_norm", "Integrated Gradients (captum)": "integrated_gradients",
           "Occlusion (remove each word)": "occlusion"}

EXPLANATION = """
**What am I looking at?** The score explained is Wen et al.'s memorization
signal m(y): how far the prompt moves the first noise prediction, averaged over
the seeds. *Gradient norm* colours each word by ‖∂m/∂y‖ of its tokens (always
positive). *Integrated Gradients* integrates the gradient over the token
embeddings (the text encoder's input) from the empty prompt's tokens to the
prompt's: word scores are signed (blue lowers m) and add up to m(y); the
convergence delta says how far the numerical integral is from that.
*Occlusion* scores each word by how much m drops when the word is removed
from the prompt: no gradient, so it is the ground truth the other two
approximate (negative: the prompt scores higher without the word). m is not
replication: on the bundled model a memorized caption without any one of its
words still replicates its photo (for 7 of 8 captions), while m moves by up to
28 %, so the word scores rank words by how much they move the first noise
prediction, not by how much the photo needs them (docs/results/attribution.md).
"""


def highlighted_words(record: RunRecord) -> list[tuple[str, float | None]]:
    """(word, score scaled to [-1, 1]) pairs with spaces between, for gr.HighlightedText."""
    scores = record.metrics["word_scores"]
    largest = max((abs(score) for score in scores), default=0.0) or 1.0
    pairs: list[tuple[str, float | None]] = []
    for row in record.table:
        pairs += [(row["word"], row["score"] / largest), (" ", None)]
    return pairs[:-1]


def attribution_summary(record: RunRecord) -> str:
    metrics = record.metrics
    ranked = sorted(record.table, key=lambda row: -row["score"])
    lines = [f"Memorization score m(y) = {metrics['score']:.4f}.",
             "Words by score: " + ", ".join(f"{row['word']} {row['score']:.3g}" for row in ranked) + "."]
    if "convergence_delta" in metrics:
        lines.append(f"Integrated Gradients' convergence delta |Σ attributions − m(y)| = "
                     f"{metrics['convergence_delta']:.2g} (more steps make it smaller).")
    return "\n\n".join(lines)


def comparison_figure(records: list[RunRecord]) -> go.Figure:
    """One bar per word and method, each method scaled to its largest |score|: where do the methods agree?

    `records`: attributions of one prompt, one per method.
    """
    figure = go.Figure()
    for record in records:
        scores = record.metrics["word_scores"]
        largest = max((abs(score) for score in scores), default=0.0) or 1.0
        # Numbered, so that a word that occurs twice ("a") keeps two bars.
        words = [f"{i}. {row['word']}" for i, row in enumerate(record.table, start=1)]
        label = next(name for name, key in METHODS.items() if key == record.config["method"])
        figure.add_trace(go.Bar(x=words, y=[score / largest for score in scores], name=label,
                                customdata=scores, hovertemplate="%{x}: %{customdata:.4g}"))
    figure.update_layout(barmode="group", height=360, margin=dict(t=50, b=40),
                         title="Word scores, each method scaled to its largest |score| (hover: the score)",
                         yaxis_title="score / largest |score|", legend=dict(orientation="h", y=-0.25))
    return figure


def build_attribution_tab(context: AppContext) -> None:
    """The tab's components and events, inside the caller's `gr.Tab`."""
    handle = context.models.get(context.models.first)
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", value=handle.memorized[0].caption if handle.memorized else "",
                            scale=3, elem_id="attribution-prompt")
        method = gr.Radio(list(METHODS), value=next(iter(METHODS)), label="Method", scale=2,
                          elem_id="attribution-method")
    with gr.Row():
        n_seeds = gr.Number(len(OBJECTIVE_SEEDS), label=f"Seeds m(y) is averaged over (1–{MAX_SEEDS})",
                            precision=None, elem_id="attribution-seeds")
        ig_steps = gr.Number(IntegratedGradients().n_steps, label=f"Integrated Gradients steps (2–{MAX_STEPS})",
                             precision=None, elem_id="attribution-ig-steps")
        run_button = gr.Button("Attribute", variant="primary", elem_id="attribution-run")
    gr.Markdown(EXPLANATION)
    # The legend is the colour scale: −1 (blue, lowers m) to +1 (red, raises m), the largest |score| being 1.
    words = gr.HighlightedText(label="Words coloured by their score, scaled to the largest |score|", show_legend=True,
                               elem_id="attribution-words")
    summary = gr.Markdown(elem_id="attribution-summary")
    plot = gr.Plot(label="The methods run on this prompt, side by side", elem_id="attribution-plot")
    build_export(context, VIEW)

    def run(prompt_text: str, method_label: str, seed_count: float | None, step_count: float | None,
            state: Session):
        model = session_handle(context.models, state)
        prompt_text = check_prompt(model, prompt_text)
        if method_label not in METHODS:
            raise gr.Error(f"Unknown method {method_label!r}; choose one of {list(METHODS)}.")
        seeds = list(range(check_whole_number("Seeds", seed_count, 1, MAX_SEEDS)))
        parameters = dict(seeds=seeds)
        if METHODS[method_label] == "integrated_gradients":
            parameters["n_steps"] = check_whole_number("Integrated Gradients steps", step_count, 2, MAX_STEPS)
        config = dict(prompt=prompt_text, method=METHODS[method_label], parameters=parameters)
        record = run_or_error(model, "attribute", config, {}, state)
        state.records[VIEW] = record
        # Keep the other methods' bars only while they explain the same prompt's score over the same seeds.
        state.attributions = {key: earlier for key, earlier in state.attributions.items()
                              if earlier.config["prompt"] == prompt_text
                              and earlier.config["parameters"]["seeds"] == seeds}
        state.attributions[config["method"]] = record
        compared = [state.attributions[key] for key in METHODS.values() if key in state.attributions]
        summary_text = attribution_summary(record)
        if state.mask is not None:
            summary_text += ("\n\nThe session's mitigation is not applied here: the score explained is the model's "
                             "own, without the mask.")
        return {words: highlighted_words(record), summary: summary_text, plot: comparison_figure(compared),
                context.session: state}

    on_model(run_button.click, run, context, inputs=[prompt, method, n_seeds, ig_steps, context.session],
             outputs=[words, summary, plot, context.session], api_name="attribute")
