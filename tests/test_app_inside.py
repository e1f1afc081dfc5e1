"""The Inside view through gradio_client on the tiny model: maps, timeline, detectors, pins, export and rerun."""

import json

import pytest
from gradio_client import Client

from analysis.bench import free_port
from analysis.export import compare_metrics
from analysis.rerun import rerun
from analysis.model import load_model
from dori_ui.app import build_app

STEPS = 3  # the tiny model folder's default


@pytest.fixture(scope="module")
def folder_handle(tiny_model_folder):
    return load_model(tiny_model_folder)


@pytest.fixture(scope="module")
def client(folder_handle):
    app = build_app(folder_handle)
    _, url, _ = app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield Client(url, verbose=False)
    app.close()


def test_the_inside_view_compares_caption_trigger_mitigation_and_held_out(client, folder_handle):
    caption, held_out = folder_handle.memorized[0].caption, folder_handle.held_out_prompts[0]
    # Without a trigger set or a mitigation, only the caption runs, and the view says why.
    _, maps, _, summary, _ = client.predict(caption, 0, 0, STEPS, 4.0, [], 0, STEPS - 1, api_name="/inside_attention")
    assert [item["caption"].split(" · ")[0] for item in maps] == ["caption", "held-out prompt"]
    assert "Trigger map view" in summary and "no mitigation is active" in summary
    client.predict(caption, "build a new set here", "pca", "replication", 1, 1, 1, api_name="/trigger_map_load")
    client.predict(caption, "Wanda (weights)", 2, 1.0, True, STEPS, 1, api_name="/mitigate")

    token, maps, grid, summary, result = client.predict(caption, 0, 1, STEPS, 4.0, ["down.1.attn.0"], 1, 2, held_out,
                                                        api_name="/inside_attention")
    labels = [label for label, _ in token["choices"]]
    assert len(labels) == folder_handle.tokenizer.model_max_length and labels[-1].endswith("(padding)")
    # Tokens read as words, not CLIP's BPE pieces.
    words = caption.split()
    assert labels[1:1 + len(words)] == [f"{i}: {word} (word)" for i, word in enumerate(words, start=1)]
    assert "</w>" not in summary and "</w>" not in str(labels)
    # All four conditions, the held-out prompt's too, each map named by its condition and token.
    assert [item["caption"] for item in maps] == [
        f"caption · {words[0]}", "trigger (trigger 0) · position 1", f"caption under the mitigation · {words[0]}",
        f"held-out prompt · {held_out.split()[0]}"]
    assert "most attended" in summary and result["value"] == "attention · held-out prompt"
    assert len(client.predict(7, api_name="/inside_token")) == 4
    # The grid: every condition's start, words and end (a trigger's positions as many), at once.
    shown = len(words) + 2
    captions = [item["caption"] for item in grid]
    assert len(captions) == 3 * shown + len(held_out.split()) + 2
    assert captions[:shown] == ["caption · 0: start", *[f"caption · {i}: {w}" for i, w in enumerate(words, start=1)],
                                f"caption · {shown - 1}: end"]

    plot, step, frames, summary, _ = client.predict(caption, 0, held_out, 1, STEPS, 4.0, api_name="/inside_timeline")
    timeline_colours = {trace["name"]: trace["line"]["color"] for trace in json.loads(plot["plot"])["data"]}
    assert step["value"] == STEPS - 1 and len(frames) == 4 and summary.count("final similarity") == 4
    assert [trace["name"] for trace in json.loads(plot["plot"])["data"]][:4] == [
        "caption", "trigger (trigger 0)", "caption under the mitigation", "held-out prompt"]
    assert len(client.predict(0, api_name="/inside_scrub")) == 4

    plot, summary, result = client.predict(caption, 0, held_out, 0, 2, STEPS, 4.0, api_name="/inside_detect")
    # Each condition's marker has one colour in every detector panel, its legend's and the timeline's.
    points = [trace for trace in json.loads(plot["plot"])["data"] if trace["type"] == "scatter"]
    assert len(points) == 3 * 4 and {trace["name"] for trace in points} == set(timeline_colours)
    assert all(trace["marker"]["color"] == timeline_colours[trace["name"]] for trace in points)
    assert len(set(timeline_colours.values())) == 4
    assert summary.count("reference prompts") == 4 * 3 and result["value"] == "detect · held-out prompt"

    client.predict("timeline · trigger (trigger 0)", api_name="/inside_result")
    pinned = client.predict("timeline · trigger (trigger 0)", api_name="/inside_pin_a")
    assert "timeline · trigger" in pinned[1] and pinned[3] == ""
    pinned = client.predict("detect · caption", api_name="/inside_pin_b")
    assert "timeline · trigger" in pinned[1] and "detect · caption" in pinned[3]
    # Pins stay in the session while other views run.
    client.predict(caption, 1, 0, STEPS, 4.0, api_name="/replicate")
    assert "detect · caption" in client.predict("detect · caption", api_name="/inside_pin_b")[3]

    client.predict("timeline · trigger (trigger 0)", api_name="/inside_result")
    recorded, reproduced = rerun(client.predict(api_name="/export_inside"), model=folder_handle.name)
    assert recorded.kind == "timeline" and recorded.metrics["conditioning"] == "embedding"
    rows = compare_metrics(recorded.metrics, reproduced.metrics)
    assert rows and all(row["match"] for row in rows)


def test_the_replicate_plot_has_the_reference_band_after_the_gallery(client, folder_handle):
    """The gallery is shown first; the band over the reference prompts (computed on first use) follows."""
    job = client.submit(folder_handle.memorized[1].caption, 2, 0, STEPS, 4.0, api_name="/replicate")
    gallery, _, first_plot = next(iter(job))
    assert len(gallery) == 2
    assert not any(trace.get("name", "").startswith("reference") for trace in json.loads(first_plot["plot"])["data"])
    _, _, plot = job.result()
    names = [trace.get("name", "") for trace in json.loads(plot["plot"])["data"]]
    assert names[0].startswith("reference prompts") and "reference median" in names and "seed 0" in names


def test_replicate_shows_the_training_image_of_a_caption(client, folder_handle):
    assert client.predict(folder_handle.memorized[0].caption, api_name="/replicate_training_image") is not None
    assert client.predict("a typed prompt", api_name="/replicate_training_image") is None


def test_the_maps_have_a_colour_scale_and_a_token_grid(client):
    components = {c["props"].get("elem_id"): c for c in client.config["components"]}
    assert "linear-gradient" in components["inside-maps-scale"]["props"]["value"]
    assert components["inside-grid"]["type"] == "gallery"


def test_an_emptied_token_list_is_no_error(client):
    """A model switch empties the token list, whose change event then asks for no token: nothing to show, no
    "Run Attention maps first" (what "Use the fine-tuned model" used to pop)."""
    fresh = Client(client.src, verbose=False)
    assert fresh.predict(None, api_name="/inside_token") == {"__type__": "update"}  # gr.skip(): left as it is
