"""Serve a Gradio app on a free local port for the duration of a test module, and talk to it as the browser does."""

import json
from collections.abc import Iterator
from contextlib import contextmanager

import gradio as gr
import httpx
from gradio_client import Client

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


def join(url: str, session_hash: str, api_name: str, arguments: list) -> str:
    """Queue `api_name` in session `session_hash` as the browser does (Gradio's queue protocol); its event id."""
    client = Client(url, verbose=False)
    fn_index = client._infer_fn_index(api_name, None)
    data = list(client.endpoints[fn_index].insert_empty_state(*arguments))  # the session's state: the server's
    joined = httpx.post(f"{url}gradio_api/queue/join", timeout=60,
                        json=dict(data=data, fn_index=fn_index, session_hash=session_hash, trigger_id=None))
    assert joined.status_code == 200, joined.text[:200]
    return joined.json()["event_id"]


def session_messages(url: str, session_hash: str, api_name: str, arguments: list,
                     on_message=lambda message: None) -> list[dict]:
    """Run `api_name` in session `session_hash` and return every message of the event, its progress and warnings
    included (gradio_client keeps only the latest); `on_message(message)` sees each as it comes."""
    event_id, messages = join(url, session_hash, api_name, arguments), []
    # The session's one stream: it carries the messages of every event of the session.
    with httpx.stream("GET", f"{url}gradio_api/queue/data", params=dict(session_hash=session_hash),
                      timeout=None) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            message = json.loads(line.removeprefix("data:"))
            if message.get("event_id") != event_id:
                continue
            messages.append(message)
            on_message(message)
            if message["msg"] == "process_completed":
                return messages
    raise AssertionError(f"the stream of {api_name} ended before its run did: {messages[-3:]}")


def left_as_they_were(completed: dict) -> bool:
    """Whether a completed event left every visible output unchanged (the session's state is sent as None)."""
    shown = [value for value in completed["output"]["data"] if value is not None]
    return bool(shown) and all(value == {"__type__": "update"} for value in shown)


def warnings_in(messages: list[dict]) -> list[str]:
    return [message["log"] for message in messages if message["msg"] == "log" and message["level"] == "warning"]
