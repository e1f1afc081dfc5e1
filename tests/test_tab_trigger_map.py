"""The Trigger map view's endpoints, driven by gradio_client on the tiny model."""

import dataclasses
import json

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from analysis.export import load_export
from dori_ui import trigger_map_tab
from dori_ui.app import build_app
from served import served
from dori_ui.trigger_map_tab import BUILD, SHIPPED

STEPS = 3
# caption, source, map, colour, triggers to build, search steps, seeds per trigger
BUILD_SMALL = (BUILD, "pca", "replication", 3, 2, 1)


@pytest.fixture(scope="module")
def app_url(tiny_handle, tmp_path_factory):
    folder = tmp_path_factory.mktemp("trigger_sets")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trigger_map_tab, "BUILT_SETS", folder)
        app = build_app(dataclasses.replace(tiny_handle, default_steps=STEPS))
        with served(app) as url:
            yield url


def test_build_map_select_and_pin(app_url, tiny_handle):
    client = Client(app_url, verbose=False)
    caption = tiny_handle.memorized[0].caption
    status, plot, table = client.predict(caption, *BUILD_SMALL, api_name="/trigger_map_load")
    assert status.startswith(f"3 triggers of “{caption}”") and "mean replication" in status
    assert [row[0] for row in table["data"]] == [0, 1, 2]
    assert plot["type"] == "plotly"
    names = [trace["name"] for trace in json.loads(plot["plot"])["data"]]
    assert names == ["triggers", "memorized prompts", "held-out prompts", "random starts"]

    gallery, summary, plot = client.predict(1, 2, "set and start", api_name="/trigger_map_show")
    assert len(gallery) == 2 and all("similarity" in item["caption"] for item in gallery)
    assert summary.startswith("Trigger 1 replicates the training image in ")
    assert "selected: trigger 1" in plot["plot"] and "triggers from random starts" in plot["plot"]

    pinned = client.predict(api_name="/trigger_map_pin_a")
    assert pinned["label"] == summary
    assert [item["caption"] for item in pinned["value"]] == [item["caption"] for item in gallery]

    # Building again with the same settings resumes the saved set: the same triggers come back.
    _, _, again = client.predict(caption, *BUILD_SMALL, api_name="/trigger_map_load")
    assert again["data"] == table["data"]


def test_each_session_has_its_own_map(app_url, tiny_handle):
    first, second = Client(app_url, verbose=False), Client(app_url, verbose=False)
    first.predict(tiny_handle.memorized[1].caption, *BUILD_SMALL, api_name="/trigger_map_load")
    with pytest.raises(AppError, match="Load or build a trigger set first"):
        second.predict(0, 1, "replication", api_name="/trigger_map_show")
    gallery, _, _ = first.predict(0, 1, "replication", api_name="/trigger_map_show")
    assert len(gallery) == 1


@pytest.mark.parametrize("arguments, message", [
    (("no such caption", *BUILD_SMALL), "not in the list of choices"),
    ((None, BUILD, "pca", "replication", 0, 2, 1), "Triggers to build must be a whole number from 1 to 256"),
    ((None, BUILD, "umap", "replication", 3, 2, 1), "UMAP with n_neighbors=15 needs more than 15"),
    ((None, SHIPPED, "pca", "replication", 3, 2, 1), "shipped trigger set|made on 'bundled demo model'"),
])
def test_bad_settings_give_a_clear_message(app_url, tiny_handle, arguments, message):
    client = Client(app_url, verbose=False)
    caption = arguments[0] or tiny_handle.memorized[0].caption
    with pytest.raises(AppError, match=message):
        client.predict(caption, *arguments[1:], api_name="/trigger_map_load")


def test_the_map_exports_as_a_trigger_map_record(app_url, tiny_handle):
    client = Client(app_url, verbose=False)
    with pytest.raises(AppError, match="Nothing to export yet: run “Load / build and map” first"):
        client.predict(api_name="/export_trigger_map")
    caption = tiny_handle.memorized[0].caption
    _, plot, _ = client.predict(caption, *BUILD_SMALL, api_name="/trigger_map_load")
    record = load_export(client.predict(api_name="/export_trigger_map"))
    assert record.kind == "trigger_map" and record.config["prompt"] == caption and record.config["method"] == "pca"
    assert record.inputs()["triggers"].shape[0] == 3 and record.metrics["triggers"] == 3
    # The table holds the plotted points: the triggers' coordinates are the plot's.
    triggers = next(trace for trace in json.loads(plot["plot"])["data"] if trace["name"] == "triggers")
    rows = [row for row in record.table if row["group"] == "triggers"]
    assert [row["x"] for row in rows] == pytest.approx(triggers["x"])


def test_a_selected_triggers_generations_export_and_rerun(app_url, tiny_handle):
    """What "Generate trigger" shows is a "replicate" run of the trigger's embedding: exported and run again, it
    gives the same similarities as the gallery."""
    from analysis.export import compare_metrics
    from analysis.tasks import run_task

    client = Client(app_url, verbose=False)
    client.predict(tiny_handle.memorized[0].caption, *BUILD_SMALL, api_name="/trigger_map_load")
    gallery, _, _ = client.predict(2, 2, "replication", api_name="/trigger_map_show")
    record = load_export(client.predict(api_name="/export_trigger_map_selected"))
    assert record.kind == "replicate" and record.config["seeds"] == [0, 1] and "embedding" in record.inputs()
    shown = [float(item["caption"].split("similarity (pixel correlation) ")[1].split(" ")[0]) for item in gallery]
    assert shown == pytest.approx(record.metrics["similarities"], abs=0.006)
    reproduced = run_task(dataclasses.replace(tiny_handle, default_steps=STEPS), record.kind, record.config,
                          inputs=record.inputs())
    assert all(row["match"] for row in compare_metrics(record.metrics, reproduced.metrics))
