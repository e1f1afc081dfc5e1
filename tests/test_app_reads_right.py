"""The views say what they measured, on which model, and show it whole: driven by gradio_client on the tiny model."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from gradio_client.utils import Status

from analysis.export import RunRecord, load_export
from dori_ui import trigger_map_tab
from dori_ui.app import build_app
from dori_ui.paths_tab import COMPARISONS, heatmaps_figure
from dori_ui.perturb_tab import SESSION_MODEL, UNMITIGATED
from dori_ui.trigger_map_tab import BUILD
from served import served

STEPS = 3


@pytest.fixture(scope="module")
def app_url(tiny_handle):
    app = build_app(dataclasses.replace(tiny_handle, default_steps=STEPS))
    with served(app) as url:
        yield url


@pytest.fixture
def client(app_url):
    return Client(app_url, verbose=False)


def mitigate_with_wanda(client: Client, prompt: str) -> None:
    client.predict(prompt, "Wanda (weights)", 2, 20.0, True, STEPS, 1, api_name="/mitigate")


def test_the_sweep_names_its_model_offers_the_unmitigated_one_and_fits_its_axis(client, tiny_handle):
    caption = tiny_handle.memorized[0].caption
    mitigate_with_wanda(client, caption)
    for run_on, named in [(SESSION_MODEL, "with the session's mitigation (wanda, for “"), (UNMITIGATED, "unmitigated")]:
        plot, summary = client.predict(caption, "0, 5, 400", 1, 1, STEPS, run_on, api_name="/sweep")
        figure = json.loads(plot["plot"])
        assert summary.startswith(f"On {tiny_handle.name}") and named in summary
        assert named in figure["layout"]["title"]["text"]
        low, high = figure["layout"]["yaxis"]["range"]
        assert all(low <= y <= high for trace in figure["data"] for y in trace["y"])


def test_the_trigger_map_says_its_rates_were_measured_unmitigated_and_flags_the_sessions_mitigation(
        client, tiny_handle, tmp_path, monkeypatch):
    monkeypatch.setattr(trigger_map_tab, "BUILT_SETS", tmp_path)
    caption = tiny_handle.memorized[0].caption
    status, _, table = client.predict(caption, BUILD, "pca", "replication", 2, 2, 1, api_name="/trigger_map_load")
    assert f"on “{tiny_handle.name}” without mitigation (1 seeds, {STEPS} steps each)" in status
    assert "This session has a mitigation" not in status
    assert "replication (unmitigated, when built)" in table["headers"]
    mitigate_with_wanda(client, caption)
    status, _, _ = client.predict(caption, BUILD, "pca", "replication", 2, 2, 1, api_name="/trigger_map_load")
    assert "**This session has a mitigation** (wanda, for “" in status and "these rates are not under it" in status


def test_the_trigger_maps_points_carry_their_trigger_for_a_click(client, tiny_handle, tmp_path, monkeypatch):
    monkeypatch.setattr(trigger_map_tab, "BUILT_SETS", tmp_path)
    caption = tiny_handle.memorized[0].caption
    for colour in ("replication", "set and start"):
        _, plot, _ = client.predict(caption, BUILD, "pca", colour, 2, 2, 1, api_name="/trigger_map_load")
        traces = [trace for trace in json.loads(plot["plot"])["data"] if trace["name"].startswith("triggers")]
        assert sorted(i for trace in traces for i in trace["customdata"]) == [0, 1]
    scripts = [c["props"] for c in client.config["components"] if c["props"].get("elem_id") == "trigger-map-click"]
    assert "plotly_click" in scripts[0]["js_on_load"] and "#trigger-map-index input" in scripts[0]["js_on_load"]
    # The Inside view's trigger follows the selection.
    assert client.predict(5, api_name="/inside_follow_selection") == 5


def test_streamed_outputs_carry_no_progress_overlay(client):
    """A streaming run shows its progress on its status line only: the loss plot, previews, log, gallery and
    table it streams, and the header, stay visible."""
    ids = {c["id"]: c["props"].get("elem_id") for c in client.config["components"]}
    shown_on = {d["api_name"]: [ids[i] for i in d.get("show_progress_on") or []]
                for d in client.config["dependencies"] if d.get("api_name")}
    assert shown_on["perturb"] == ["perturb-status"] and shown_on["finetune"] == ["finetune-status"]
    assert shown_on["mitigate"] == ["mitigate-summary"] and shown_on["replicate"] == ["replicate-summary"]


def test_heatmaps_and_highlighting_have_their_scales(client):
    components = {c["props"].get("elem_id"): c["props"] for c in client.config["components"]}
    assert components["attribution-words"]["show_legend"] is True  # −1 … +1, the attribution's colour scale
    record = RunRecord("agreement", "m", {}, metrics={name: {"l": {}} for name in COMPARISONS},
                       table=[{"layer": "l"}], tensors={f"iou.{name}": torch.rand(1, 2, 2) for name in COMPARISONS})
    figure = heatmaps_figure(record)
    assert [trace.colorbar.title.text for trace in figure.data if trace.showscale] == ["IoU"]
    assert figure.layout.xaxis3.title.text == "trigger" and figure.layout.yaxis.title.text == "trigger"


def test_perturb_starts_from_the_trigger_selected_on_the_map(client, tiny_handle, tmp_path, monkeypatch):
    monkeypatch.setattr(trigger_map_tab, "BUILT_SETS", tmp_path)
    caption = tiny_handle.memorized[0].caption
    start = "the Trigger map's selected trigger"
    arguments = (caption, start, "", 0, None, 1, 0.1, 1, 1, STEPS, 0)
    with pytest.raises(AppError, match="Select a trigger in the Trigger map view first"):
        client.predict(*arguments, api_name="/perturb")
    client.predict(caption, BUILD, "pca", "replication", 2, 2, 1, api_name="/trigger_map_load")
    client.predict(1, 1, "replication", api_name="/trigger_map_show")
    selected = load_export(client.predict(api_name="/export_trigger_map_selected")).inputs()["embedding"]
    client.predict(*arguments, api_name="/perturb")
    attack = load_export(client.predict(api_name="/export_perturb"))
    assert attack.config["starts"] == [{"kind": "embedding", "input": "start"}]
    assert torch.equal(attack.inputs()["start"], selected)


def test_stop_ends_a_sweep(client, tiny_handle):
    job = client.submit(tiny_handle.memorized[0].caption, "0, 5, 10", 64, 8, 400, api_name="/sweep")
    deadline = time.monotonic() + 60
    while job.status().code != Status.PROCESSING:
        assert time.monotonic() < deadline, "the sweep never started"
        time.sleep(0.05)
    assert client.predict(api_name="/sweep_stop").startswith("Stopping")
    # A stop is no error: the outputs stay as they were but for the view's status, which says it stopped.
    assert "Stopped." in job.result(timeout=120)
