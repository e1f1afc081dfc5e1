"""The views say what they measured, on which model, and show it whole: driven by gradio_client on the tiny model."""

from __future__ import annotations

import dataclasses
import json

import pytest
from gradio_client import Client

from dori_ui.app import build_app
from dori_ui.perturb_tab import SESSION_MODEL, UNMITIGATED
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
