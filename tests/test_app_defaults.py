"""Every view's runs with exactly the defaults its page shows: a newcomer who clicks each button without touching a
field gets a result, not an error.

`gradio_client` fills every argument left out with the component's default, the value the page shows, so each
endpoint is called with no arguments. The quick views run on the bundled model; those long by nature (NeMo's
localization, the Dori search, mask agreement, fine-tuning) run on the tiny model with its page's defaults.
"""

from __future__ import annotations

import dataclasses

import pytest
from gradio_client import Client

from analysis.model import DEMO_MODEL_DIR, load_model
from dori_ui import finetune_tab, mitigate_tab, paths_tab, trigger_map_tab
from dori_ui.app import build_app
from dori_ui.trigger_map_tab import BUILD
from served import served

# Bundled model: the views of the paper's story that take seconds with their defaults, in page order (the trigger
# map loads the set that Paths & masks and Inside read).
BUNDLED_VIEWS = ["replicate", "trigger_map_load", "trigger_map_show", "paths_discrepancy", "attribute",
                 "inside_attention", "inside_timeline", "inside_detect"]
# Tiny model: the views that take minutes on the bundled model with their defaults.
TINY_VIEWS = ["mitigate", "perturb", "sweep", "trigger_map_load", "paths_masks", "finetune"]


def defaults(app, api_name: str) -> dict:
    """The values the page shows for the inputs of `api_name`, by label."""
    components = {c["id"]: c for c in app.config["components"]}
    (dependency,) = [d for d in app.config["dependencies"] if d.get("api_name") == api_name]
    return {components[i]["props"].get("label"): components[i]["props"].get("value") for i in dependency["inputs"]
            if components[i]["type"] != "state"}


@pytest.fixture(scope="module")
def bundled():
    app = build_app(load_model(str(DEMO_MODEL_DIR)))
    with served(app) as url:
        yield app, Client(url, verbose=False)


@pytest.fixture(scope="module")
def tiny(tiny_handle, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trigger_map_tab, "BUILT_SETS", tmp_path_factory.mktemp("trigger_sets"))
        patch.setattr(finetune_tab, "RUNS", tmp_path_factory.mktemp("finetune"))
        # The tiny model's 16-pixel images take 2 MS-SSIM scales at most (not a field of the page).
        patch.setattr(mitigate_tab, "NEMO_PARAMETERS", dict(scales=2))
        patch.setattr(paths_tab, "NEMO_PARAMETERS", dict(scales=2))
        app = build_app(dataclasses.replace(tiny_handle, default_steps=3))
        with served(app) as url:
            yield app, Client(url, verbose=False)


def test_the_bundled_models_quick_views_run_with_the_shown_defaults(bundled):
    app, client = bundled
    for view in BUNDLED_VIEWS:
        # An empty upload field has no default for gradio_client: it is passed as the page leaves it, empty.
        empty = dict(upload_path=None) if view == "perturb" else {}
        result = client.predict(**empty, api_name=f"/{view}")
        assert result is not None, (view, defaults(app, view))


def test_the_long_views_run_with_the_shown_defaults(tiny):
    app, client = tiny
    for view in TINY_VIEWS:
        if view == "trigger_map_load":  # no set ships for the tiny model: build one with the shown settings
            shown = defaults(app, view)
            client.predict(*[BUILD if label == "Trigger set" else value for label, value in shown.items()],
                           api_name=f"/{view}")
            continue
        # An empty upload field has no default for gradio_client: it is passed as the page leaves it, empty.
        empty = dict(upload_path=None) if view == "perturb" else {}
        result = client.predict(**empty, api_name=f"/{view}")
        assert result is not None, (view, defaults(app, view))
