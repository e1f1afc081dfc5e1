"""Serve a Gradio app on a free local port for the duration of a test module."""

from collections.abc import Iterator
from contextlib import contextmanager

import gradio as gr

from analysis.bench import free_port
from dori_ui.app import launch_options


@contextmanager
def served(app: gr.Blocks) -> Iterator[str]:
    """The app's URL while it runs in this process."""
    _, url, _ = app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                           **launch_options())
    try:
        yield url
    finally:
        app.close()
