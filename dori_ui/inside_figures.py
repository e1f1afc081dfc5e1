"""How the Inside view draws its records: plots, token names, the attention maps' colour scale, descriptions.

One colour per condition (caption, trigger, mitigated caption, held-out prompt), the same in every plot and legend.
"""

from __future__ import annotations

import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.detectors import DETECTORS
from analysis.export import RunRecord

DETECTOR_NAMES = {"noise_gap": "Wen et al.'s noise gap", "attention_entropy": "attention entropy (Ren et al.)",
                  "bright_ending": "bright ending (Chen et al.)"}
CONDITION_COLOURS = plotly.colors.qualitative.Plotly
WORD_END = "</w>"  # CLIP's BPE marks the last piece of a word with it

# `analysis.attention.overlay`'s scale (black, red, yellow, white over the greyed image), each token's map divided by
# its own maximum.
MAPS_SCALE = """
<div style="display:flex;align-items:center;gap:8px;font-size:0.85em">
<span>0</span>
<span style="flex:0 0 240px;height:12px;background:linear-gradient(to right,#000,#f00,#ff0,#fff);
border:1px solid #888"></span>
<span>the token's largest share</span>
<span style="opacity:0.75">· colour: the share of each pixel's attention that goes to the token, over the greyed
image</span>
</div>
"""


def colour(k: int) -> str:
    """The colour of the `k`-th condition of a run of the view."""
    return CONDITION_COLOURS[k % len(CONDITION_COLOURS)]


def token_word(token: dict) -> str:
    """A token as a reader names it: the word piece without CLIP's end-of-word mark ("portrait", "eile-" then
    "en"); start, end and padding tokens and an embedding's positions by their kind."""
    text, kind = token["text"], token["kind"]
    if kind == "word":
        return text.removesuffix(WORD_END) if text.endswith(WORD_END) else f"{text}-"
    return text if kind == "position" else kind


def token_choices(tokens: list[dict]) -> list[tuple[str, int]]:
    """The token dropdown: position, word and kind."""
    return [(f"{i}: {token_word(t)} ({t['kind']})", i) for i, t in enumerate(tokens)]


def timeline_figure(records: dict[str, RunRecord]) -> go.Figure:
    figure = go.Figure()
    for k, (label, record) in enumerate(records.items()):
        if "similarities" in record.metrics:
            figure.add_trace(go.Scatter(y=record.metrics["similarities"], mode="lines+markers", name=label,
                                        line=dict(color=colour(k))))
    first = next(iter(records.values()))
    figure.add_hline(y=first.metrics["threshold"], line_dash="dash",
                     annotation_text=f"replica: {first.metrics['metric']} > {first.metrics['threshold']:g}")
    figure.update_layout(title="Similarity of x̂₀ to the training image, step by step", xaxis_title="denoising step",
                         yaxis_title=f"similarity ({first.metrics['metric']})", height=360, margin=dict(t=50, b=40))
    return figure


def detector_figure(records: dict[str, RunRecord]) -> go.Figure:
    """One panel per detector: the reference prompts' scores as a box, each condition's score as a point."""
    figure = make_subplots(rows=1, cols=len(DETECTORS), subplot_titles=[DETECTOR_NAMES[n] for n in DETECTORS])
    first = next(iter(records.values()))
    for column, name in enumerate(DETECTORS, start=1):
        figure.add_trace(go.Box(y=first.tensors[f"reference.{name}"].tolist(), name="reference prompts",
                                boxpoints="all", marker_color="#7f7f7f", showlegend=column == 1), row=1, col=column)
        for k, (label, record) in enumerate(records.items()):
            figure.add_trace(go.Scatter(x=["reference prompts"], y=[record.metrics["scores"][name]], mode="markers",
                                        marker=dict(size=12, symbol="diamond", color=colour(k)), name=label,
                                        legendgroup=label, showlegend=column == 1), row=1, col=column)
        figure.update_yaxes(title_text="score", row=1, col=column)
    figure.update_layout(height=380, margin=dict(t=60, b=40))
    return figure


def describe(label: str, record: RunRecord) -> str:
    """A result in words, for the summary and the pins."""
    lines = [f"**{record.kind} · {label}** (seed {record.config.get('seed', record.config.get('seeds'))}, "
             f"{record.config['steps']} steps, guidance {record.config['guidance']:g})"]
    metrics = record.metrics
    if record.kind == "attention":
        shares = sorted(zip(metrics["token_shares"], metrics["tokens"]), key=lambda pair: -pair[0])[:5]
        lines.append("most attended: " + ", ".join(f"{token_word(t)} ({t['kind']}) {s:.1%}" for s, t in shares))
    elif record.kind == "timeline" and "similarities" in metrics:
        lock = metrics["lock_in_step"]
        lines.append(f"final similarity {metrics['final_similarity']:.3f}; "
                     + ("never locks in" if lock is None else f"locks in at step {lock}"))
    elif record.kind == "detect":
        lines += [f"{DETECTOR_NAMES[n]}: {metrics['scores'][n]:.4g} (above {metrics['percentiles'][n]:.0%} of the "
                  f"{metrics['reference_prompts']} reference prompts)" for n in DETECTORS]
    return "\n\n".join(lines)
