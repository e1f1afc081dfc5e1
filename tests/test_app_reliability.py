"""The app under a careful user and an attacker: cancelled runs, concurrent sessions, bad inputs, limits."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import Status

from analysis.bench import free_port
from dori_ui.app import PROGRESS_POLL_S, QUEUE_POLL_S, build_app, launch_options, set_queue_polling
from dori_ui.session import ModelChoices
from served import join, left_as_they_were, served, session_messages, warnings_in

STEPS = 3
WANDA = "Wanda (weights)"
# A run long enough to cancel in the middle on the tiny model (several seconds on this machine).
LONG_SEEDS, LONG_STEPS = 64, 400


@pytest.fixture(scope="module")
def app_url(tiny_handle, tiny_model_dir):
    app = build_app(dataclasses.replace(tiny_handle, default_steps=STEPS), allowed_roots=[tiny_model_dir])
    with served(app) as url:
        yield url


def new_client(url: str) -> Client:
    return Client(url, verbose=False)


def replicate(client: Client, prompt: str, seeds: int = 2, steps: int = STEPS):
    """The gallery's captions (verdict, similarity, seed) and the summary: what a session sees of a run."""
    gallery, summary, _ = client.predict(prompt, seeds, 5, steps, 4.0, api_name="/replicate")
    return [item["caption"] for item in gallery], summary


def mitigate(client: Client, prompt: str, sparsity: float = 1.0) -> str:
    return client.predict(prompt, WANDA, 2, sparsity, True, STEPS, 2, api_name="/mitigate")[5]


# How long a wait may see nothing move (the job's state, its place in the queue, its progress) before it fails.
# The waits themselves follow progress: under load, a queued run waits as long as the runs ahead of it move.
STALL_S = 120


def wait_for_steps(job, steps: int) -> bool:
    """Wait until `job` has reported `steps` steps of progress (True) or has ended (False)."""
    seen, last_change = None, time.monotonic()
    while True:
        status = job.status()
        if job.done():
            return False
        done = max((unit.index or 0 for unit in status.progress_data or []), default=0)
        if status.code in (Status.PROCESSING, Status.ITERATING, Status.PROGRESS) and done >= steps:
            return True
        state = (status.code, status.rank, done)
        if state != seen:
            seen, last_change = state, time.monotonic()
        assert time.monotonic() - last_change < STALL_S, f"the run stalled in state {state} for {STALL_S} s"
        time.sleep(0.02)


def finished(job):
    """`job`'s result once it has ended, failing if it stops moving for STALL_S."""
    assert wait_for_steps(job, math.inf) is False
    return job.result()


def cancel_after_steps(job, steps: int) -> None:
    """Cancel `job` once it has run `steps` denoising steps."""
    assert wait_for_steps(job, steps), f"the run ended before it could be cancelled: {job.exception()!r}"
    job.cancel()


def test_a_cancelled_run_leaks_no_mitigation_into_another_session(app_url, tiny_handle):
    caption = tiny_handle.memorized[0].caption
    a, b = new_client(app_url), new_client(app_url)
    unmitigated = replicate(b, caption)
    assert "mitigation:** wanda" in mitigate(a, caption, sparsity=20.0)
    mitigated = replicate(a, caption)
    assert mitigated != unmitigated  # the mask changes what A's generations look like
    job = a.submit(caption, LONG_SEEDS, 0, LONG_STEPS, 4.0, api_name="/replicate")
    cancel_after_steps(job, 10)
    assert replicate(b, caption) == unmitigated
    # A's own session still has its mask, and its next run is its own.
    assert replicate(a, caption) == mitigated
    # The same for a streaming view: a Dori search under A's mask, cancelled mid-way.
    search = a.submit(caption, "random embedding", "", 0, None, 1000, 0.1, 8, 2, STEPS, 0, api_name="/perturb")
    cancel_after_steps(search, 10)
    assert replicate(b, caption) == unmitigated


def test_four_sessions_cancelling_at_random_each_get_their_own_results(app_url, tiny_handle):
    caption = tiny_handle.memorized[1].caption
    sparsities = [None, 1.0, 10.0, 30.0]  # one session unmitigated, three with different Wanda masks
    clients = [new_client(app_url) for _ in sparsities]
    expected = []
    for client, sparsity in zip(clients, sparsities):
        if sparsity is not None:
            mitigate(client, caption, sparsity)
        expected.append(replicate(client, caption))
    assert len({str(result) for result in expected}) > 1
    randomness = random.Random(0)
    cancel_steps = [[randomness.randint(1, 20) for _ in range(2)] for _ in clients]  # a random step, mid-run
    results: dict[int, list] = {}
    failures: list[BaseException] = []

    def session(index: int) -> None:
        try:
            for steps in cancel_steps[index]:
                job = clients[index].submit(caption, LONG_SEEDS, 0, LONG_STEPS, 4.0, api_name="/replicate")
                cancel_after_steps(job, steps)
                results.setdefault(index, []).append(replicate(clients[index], caption))
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            failures.append(err)

    threads = [threading.Thread(target=session, args=(index,)) for index in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not failures, failures
    for index, runs in results.items():
        assert runs == [expected[index]] * 2, f"session {index} (sparsity {sparsities[index]})"
    assert sorted(results) == [0, 1, 2, 3]


def test_a_late_cancel_does_not_stop_the_sessions_next_run(app_url, tiny_handle):
    client = new_client(app_url)
    caption = tiny_handle.memorized[0].caption
    first = client.submit(caption, 1, 0, STEPS, 4.0, api_name="/replicate")
    first.result()
    running = client.submit(caption, 2, 0, LONG_STEPS, 4.0, api_name="/replicate")
    assert wait_for_steps(running, 1)
    first.cancel()  # the cancel of the run that ended arrives while the session's next one runs
    gallery, summary, _ = finished(running)
    assert len(gallery) == 2 and "Stopped" not in summary


# Cheap valid arguments of every endpoint with numeric or text inputs; the fuzz test replaces one at a time.
def base_arguments(tiny_handle) -> dict[str, list]:
    caption, held_out = tiny_handle.memorized[0].caption, tiny_handle.held_out_prompts[0]
    return {
        "/replicate": [caption, 1, 0, STEPS, 4.0],
        "/mitigate": [caption, WANDA, 2, 1.0, True, STEPS, 1],
        "/perturb": [caption, "random embedding", "", 0, None, 1, 0.1, 1, 1, STEPS, 0],
        "/sweep": [caption, "0, 5", 1, 1, STEPS, "the session's model, with its mitigation if any"],
        "/attribute": [caption, "Gradient norm (Wen et al.)", 1, 4],
        "/trigger_map_load": [caption, "build a new set here", "pca", "replication", 1, 1, 1],
        "/trigger_map_show": [0, 1, "replication"],
        "/show": [0, 1, "replication"],  # the same handler, after a table row is selected
        "/paths_discrepancy": ["value", 2],
        "/paths_masks": [2, 1],
        "/finetune": [[caption], 1, 1, 1, 1, 1, 1, 1e-4, "adam", "the whole UNet (the paper's)",
                      "toward the noise (L_DM, the paper's)", 0],
        "/switch_model": [tiny_handle.name],
        "/replicate_training_image": [caption],
        "/inside_attention": [caption, 0, 0, STEPS, 4.0, [], 0, STEPS - 1, held_out],
        "/inside_follow_selection": [0],
        "/inside_token": [1],
        "/inside_timeline": [caption, 0, held_out, 0, STEPS, 4.0],
        "/inside_scrub": [0],
        "/inside_detect": [caption, 0, held_out, 0, 1, STEPS, 4.0],
        "/inside_result": ["attention · caption"],
        "/inside_pin_a": ["attention · caption"],
        "/inside_pin_b": ["attention · caption"],
    }


BAD_NUMBERS = [math.nan, math.inf, -math.inf, -1, 2**70, 0.5, "twelve", [1, 2], None]
BAD_TEXTS = ["x" * 10_000, "a\x00b\x07c", "line one\nline two", 12, [1, 2], None]


def fuzzed_positions(client: Client) -> dict[str, list[tuple[int, str]]]:
    """Endpoint -> (position, component) of each Number, Textbox or typed-in Dropdown input, from the API."""
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    return {name: [(i, p["component"]) for i, p in enumerate(info["parameters"])
                   if p["component"] in ("Number", "Textbox", "Dropdown")
                   and p.get("python_type", {}).get("type") in ("float", "int", "str")]
            for name, info in endpoints.items()}


def raw_call(url: str, api_name: str, arguments: list) -> tuple[str, object]:
    """Call an endpoint over HTTP with JSON as a client may send it (NaN and Infinity included, which
    gradio_client refuses to encode); returns the last event's name ("complete" or "error") and its data."""
    body = json.dumps({"data": arguments})  # json writes NaN and Infinity, and Python's json reads them back
    posted = httpx.post(f"{url}gradio_api/call{api_name}", content=body,
                        headers={"Content-Type": "application/json"}, timeout=60)
    assert posted.status_code == 200, (api_name, arguments, posted.text[:200])
    stream = httpx.get(f"{url}gradio_api/call{api_name}/{posted.json()['event_id']}", timeout=300).text
    events = re.findall(r"^event: (\w+)\ndata: (.*)$", stream, flags=re.M)
    name, data = events[-1]
    return name, json.loads(data)


def test_every_numeric_and_text_input_gets_the_apps_own_message(app_url, tiny_handle):
    positions = {name: found for name, found in fuzzed_positions(new_client(app_url)).items() if found}
    bases = base_arguments(tiny_handle)
    missing = sorted(set(positions) - set(bases) - {"/pick_sd14_prompt", "/trigger_map_prepare",
                                                    "/trigger_map_recolour"})
    assert not missing, f"endpoints with numeric or text inputs the fuzz test does not cover: {missing}"
    answered = 0
    for name, found in positions.items():
        if name not in bases:
            continue
        for position, component in found:
            for bad in BAD_NUMBERS if component == "Number" else BAD_TEXTS:
                arguments = list(bases[name])
                arguments[position] = bad
                outcome, data = raw_call(app_url, name, arguments)
                if outcome == "error":  # the app's own message, never Gradio's empty or generic one
                    message = data.get("error") if isinstance(data, dict) else None
                    assert isinstance(message, str) and message.strip(), (name, position, bad, data)
                else:
                    assert outcome == "complete", (name, position, bad, outcome)
                answered += 1
        caption = tiny_handle.memorized[1].caption
        assert len(replicate(new_client(app_url), caption, seeds=1)[0]) == 1, f"no answer after fuzzing {name}"
    assert answered > 100


def test_switching_to_the_same_model_keeps_the_mitigation_and_the_results(app_url, tiny_handle):
    client = new_client(app_url)
    caption = tiny_handle.memorized[0].caption
    header = mitigate(client, caption)
    for name in (tiny_handle.name, "", "   "):
        with pytest.raises(AppError, match="already uses|Choose a model"):
            client.predict(name, api_name="/switch_model")
    assert "Generated with the session's mitigation" in replicate(client, caption)[1]
    assert client.predict(api_name="/export_mitigate").endswith(".zip")
    assert "wanda" in header


def test_wen_mitigates_a_typed_prompt_against_every_training_image(app_url, tiny_handle):
    client = new_client(app_url)
    typed = tiny_handle.memorized[0].caption + " again"
    log, summary, plot, before, after, header = client.predict(
        typed, "Wen et al. (prompt embedding)", 2, 1.0, True, STEPS, 2, api_name="/mitigate")
    assert "Wen et al." in summary and len(before) == len(after) == 2 and "Before:" in summary


def test_a_symlink_out_of_the_allowed_root_is_not_offered(tiny_handle, tiny_model_dir, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(tiny_model_dir, target_is_directory=True)
    inside = root / "copy"
    inside.symlink_to(root / "linked")  # a link to a link, still leading outside
    models = ModelChoices(tiny_handle, allowed_roots=[root])
    assert models.names() == [tiny_handle.name]
    with pytest.raises(ValueError, match="outside the allowed roots"):
        models.allowed_source(str(root / "linked"))


def test_a_run_past_the_time_limit_is_stopped_with_a_message(tiny_handle):
    app = build_app(dataclasses.replace(tiny_handle, default_steps=STEPS), max_run_seconds=1.0)
    with served(app) as url:
        messages = session_messages(url, "time-limit", "/replicate",
                                    [tiny_handle.memorized[0].caption, LONG_SEEDS, 0, LONG_STEPS, 4.0])
        # A stop, not an error: the outputs stay as they were, and the message says why.
        completed = messages[-1]
        assert completed["success"], completed
        assert left_as_they_were(completed), completed
        assert any("limit of 1 s per request" in warning for warning in warnings_in(messages)), messages
        # The stopped run freed the model: the next one runs.
        assert len(replicate(new_client(url), tiny_handle.memorized[0].caption, seeds=1)[0]) == 1


def test_stopping_a_fine_tuning_run_is_a_stop_not_an_error(app_url, tiny_handle):
    session = "stopped-finetune"
    stopped = []

    def stop_once_started(message: dict) -> None:
        units = message.get("progress_data") or []
        if not stopped and any("Replication before" in (unit.get("desc") or "") for unit in units):
            stopped.append(join(app_url, session, "/finetune_stop", []))

    arguments = [[tiny_handle.memorized[0].caption], 1, 1, 1, 1, 1, LONG_SEEDS, 1e-4, "adam",
                 "the whole UNet (the paper's)", "toward the noise (L_DM, the paper's)", 0]
    messages = session_messages(app_url, session, "/finetune", arguments, stop_once_started)
    assert stopped, "the run ended before it could be stopped"
    completed = messages[-1]
    assert completed["success"], completed  # no output shows an error
    status, *others = completed["output"]["data"]
    assert status == "Stopped." and left_as_they_were(dict(output=dict(data=others))), completed


def test_uploads_over_the_limit_are_refused(tiny_handle, tmp_path):
    app = build_app(tiny_handle)
    _, url, _ = app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                           **launch_options(max_upload_bytes=1000))
    try:
        big = tmp_path / "big.safetensors"
        big.write_bytes(os.urandom(5000))
        client = new_client(url)
        with pytest.raises(Exception, match="(?i)file size|too large|exceeds"):
            client.predict(tiny_handle.memorized[0].caption, "uploaded embedding (.safetensors)", "", 0,
                           handle_file(str(big)), 1, 0.1, 1, 1, STEPS, 0, api_name="/perturb")
    finally:
        app.close()


def test_exports_leave_one_folder_per_view_and_none_after_the_session(app_url, tiny_handle):
    client = new_client(app_url)
    caption = tiny_handle.memorized[0].caption
    replicate(client, caption, seeds=1)
    first = Path(client.predict(api_name="/export_replicate"))
    assert first.is_file()
    # The server's own folder of the first export (Gradio hands the client a copy).
    folders_before = set(Path(tempfile.gettempdir()).glob("dori-export-*"))
    client.predict(api_name="/export_replicate")
    folders_after = set(Path(tempfile.gettempdir()).glob("dori-export-*"))
    assert len(folders_after - folders_before) == 1 and len(folders_before - folders_after) == 1


def test_removing_a_session_removes_its_exports(tmp_path):
    from dori_ui.export import remove_exports
    from dori_ui.session import Session

    folder = tmp_path / "dori-export-x"
    folder.mkdir()
    (folder / "a.zip").write_text("zip")
    session = Session(model="m", export_folders={"replicate": folder})
    remove_exports(session)
    assert not folder.exists() and session.export_folders == {}


@pytest.mark.parametrize("endpoint", ["/replicate", "/perturb"])
def test_out_of_memory_in_a_view_is_a_message_and_the_app_stays_usable(app_url, tiny_handle, monkeypatch, endpoint):
    import dori_ui.streaming

    real_run_task = dori_ui.streaming.run_task

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    client = new_client(app_url)
    caption = tiny_handle.memorized[0].caption
    arguments = {"/replicate": [caption, 1, 0, STEPS, 4.0],
                 "/perturb": [caption, "random embedding", "", 0, None, 1, 0.1, 1, 1, STEPS, 0]}[endpoint]
    monkeypatch.setattr(dori_ui.streaming, "run_task", out_of_memory)
    with pytest.raises(AppError, match="ran out of memory for this run"):
        client.predict(*arguments, api_name=endpoint)
    monkeypatch.setattr(dori_ui.streaming, "run_task", real_run_task)
    assert len(replicate(client, caption, seeds=1)[0]) == 1


def test_the_queue_polls_at_the_apps_intervals_which_are_what_gradios_loops_read(tiny_handle):
    import inspect

    from gradio.queueing import Queue

    queue = build_app(tiny_handle)._queue
    assert (queue.sleep_when_free, queue.progress_update_sleep_when_free) == (QUEUE_POLL_S, PROGRESS_POLL_S)
    # The attributes set are the ones Gradio's event and progress loops sleep on.
    assert "asyncio.sleep(self.sleep_when_free)" in inspect.getsource(Queue.start_processing)
    assert "asyncio.sleep(self.progress_update_sleep_when_free)" in inspect.getsource(Queue.start_progress_updates)


def test_a_gradio_without_the_polling_attributes_is_refused():
    class Blocks:
        _queue = type("Queue", (), {})()

    with pytest.raises(RuntimeError, match="has no sleep_when_free: update set_queue_polling"):
        set_queue_polling(Blocks(), QUEUE_POLL_S, PROGRESS_POLL_S)
