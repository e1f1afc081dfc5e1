import socket

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from dori_ui.app import build_app

STEPS = 3


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def client(tiny_handle):
    app = build_app(tiny_handle)
    _, url, _ = app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield Client(url, verbose=False)
    app.close()


def test_replicate_endpoint_returns_images_and_similarities(client, tiny_handle):
    gallery, summary, plot = client.predict(tiny_handle.memorized[0].caption, 2, 5, STEPS, 4.0,
                                            api_name="/replicate")
    assert len(gallery) == 2
    assert gallery[0]["image"].endswith(".png")
    assert "similarity" in gallery[0]["caption"] and "seed 5" in gallery[0]["caption"]
    assert "of 2 seeds replicate" in summary
    assert plot["type"] == "plotly"


@pytest.mark.parametrize("prompt, seeds, steps, message", [
    ("", 2, STEPS, "prompt is empty"),
    ("a red circle", 17, STEPS, "Seeds must be a whole number from 1 to 16"),
    ("a red circle", 2, 0, "Steps must be a whole number from 1 to 100"),
])
def test_bad_input_gives_a_clear_error(client, prompt, seeds, steps, message):
    with pytest.raises(AppError, match=message):
        client.predict(prompt, seeds, 0, steps, 4.0, api_name="/replicate")
