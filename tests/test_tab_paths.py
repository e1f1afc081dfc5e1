"""The Paths & masks view's endpoints, driven by gradio_client on the tiny model."""

import dataclasses
import json
import time
import zipfile

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from analysis.export import load_export
from dori_ui import paths_tab, trigger_map_tab
from dori_ui.app import build_app
from served import served
from dori_ui.trigger_map_tab import BUILD

STEPS = 3


@pytest.fixture(scope="module")
def client(tiny_handle, tmp_path_factory):
    """A session with a 3-trigger set loaded in the Trigger map view."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trigger_map_tab, "BUILT_SETS", tmp_path_factory.mktemp("trigger_sets"))
        # The tiny model's 16-pixel images take 2 MS-SSIM scales at most.
        patch.setattr(paths_tab, "NEMO_PARAMETERS", dict(scales=2, steps=4))
        patch.setattr(paths_tab, "WANDA_PARAMETERS", dict(steps=4))
        app = build_app(dataclasses.replace(tiny_handle, default_steps=STEPS))
        with served(app) as url:
            client = Client(url, verbose=False)
            client.predict(tiny_handle.memorized[0].caption, BUILD, "pca", "replication", 3, 2, 1,
                           api_name="/trigger_map_load")
            yield client


def test_discrepancy_of_triggers_beside_prompts(client):
    summary, plot = client.predict("value", 3, api_name="/paths_discrepancy")
    assert summary.startswith("3 triggers of “") and "triggers / prompts" in summary
    traces = json.loads(plot["plot"])["data"]
    assert [trace["name"] for trace in traces] == ["triggers of the image", "different memorized prompts"]
    assert len(traces[0]["x"]) == len(traces[1]["x"]) > 0 and all(y >= 0 for y in traces[0]["y"])


def test_masks_per_trigger_as_iou_heatmaps_and_counts(client):
    status, plot, counts = client.predict(2, 2, api_name="/paths_masks")
    assert status.startswith("NeMo and Wanda fitted on 2 triggers")
    figure = json.loads(plot["plot"])
    heatmaps = [trace for trace in figure["data"] if trace["type"] == "heatmap"]
    rows = counts["data"]
    layers = [row[0] for row in rows]
    assert len(heatmaps) == 3 * len(layers)  # NeMo–NeMo, Wanda–Wanda, NeMo–Wanda for every layer
    for heatmap in heatmaps:
        # 2 × 2 pairs; a cell is a number in [0, 1] or, where both masks are empty, None marked ∅.
        assert len(heatmap["z"]) == 2 and all(len(line) == 2 for line in heatmap["z"])
        for values, texts in zip(heatmap["z"], heatmap["text"]):
            for value, text in zip(values, texts):
                assert (value is None and text == "∅") or (0 <= value <= 1 and text == f"{value:.2f}")
    assert all(row[1] >= 0 and row[2] >= 0 and row[6].endswith("%") for row in rows)


def test_a_localizer_error_is_shown(client, monkeypatch):
    monkeypatch.setattr(paths_tab, "NEMO_PARAMETERS", dict(scales=3, steps=4))
    with pytest.raises(AppError, match="smaller than the 7x7 SSIM window"):
        client.predict(2, 2, api_name="/paths_masks")


def test_too_many_triggers_is_refused(client):
    with pytest.raises(AppError, match="Triggers compared must be a whole number from 2 to 3"):
        client.predict("value", 4, api_name="/paths_discrepancy")


def test_without_a_trigger_set_the_view_says_where_to_load_one(client):
    fresh = Client(client.src, verbose=False)
    with pytest.raises(AppError, match="Load or build a trigger set in the Trigger map view first"):
        fresh.predict("value", 2, api_name="/paths_discrepancy")


def test_each_comparison_exports_its_last_run(client):
    client.predict("ff", 2, api_name="/paths_discrepancy")
    discrepancy = load_export(client.predict(api_name="/export_paths"))
    assert discrepancy.kind == "discrepancy" and discrepancy.config["layers"] == "ff"
    assert discrepancy.inputs()["triggers"].shape[0] == 2 and discrepancy.table
    client.predict(2, 2, api_name="/paths_masks")
    path = client.predict(api_name="/export_paths_masks")
    with zipfile.ZipFile(path) as archive:
        assert {"config.json", "metrics.json", "table.csv", "tensors.safetensors"} <= set(archive.namelist())
    agreement = load_export(path)
    assert agreement.kind == "agreement" and agreement.config["seeds"] == [0, 1]
    assert agreement.config["nemo"]["scales"] == 2 and "iou.nemo_wanda" in agreement.tensors


def test_export_before_a_comparison_says_which_to_run(client):
    fresh = Client(client.src, verbose=False)
    with pytest.raises(AppError, match="Nothing to export yet: run “Compare activation paths” first"):
        fresh.predict(api_name="/export_paths")
    with pytest.raises(AppError, match="Nothing to export yet: run “Localize each trigger” first"):
        fresh.predict(api_name="/export_paths_masks")


def test_localizing_shows_the_total_of_fits_and_stops(client, monkeypatch):
    monkeypatch.setattr(paths_tab, "NEMO_PARAMETERS", dict(scales=2, steps=200))  # long enough to stop midway
    job = client.submit(3, 2, api_name="/paths_masks")
    deadline = time.monotonic() + 120
    while not (shown := job.status().progress_data or []):
        assert time.monotonic() < deadline, "the run never reported progress"
        time.sleep(0.05)
    # Three triggers, NeMo and Wanda each: six fits, counted over all of them while each fit reports its own steps.
    assert shown[0].unit == "fits" and shown[0].length == 6 and "trigger 1 of 3" in shown[0].desc
    assert client.predict(api_name="/paths_masks_stop").startswith("Stopping")
    # A stop is no error: the outputs stay as they were but for the view's status, which says it stopped.
    assert "Stopped." in job.result(timeout=120)
