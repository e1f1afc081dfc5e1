"""How a view runs the model: one computation at a time, stoppable, and never outliving its event.

Every event that runs the model is registered through `model_event`. Its
handler runs in a worker thread; when Gradio cancels the event (a closed tab,
a client's cancel), the wrapper sets the session's stop flag and returns only
once the computation has stopped, so Gradio frees the model's queue slot only
then. The same happens when a run exceeds the app's time limit per request.

Computations hold `MODEL_LOCK`: `run_or_error` (one `run_task` call),
`stream_task` (one `run_task` call whose events a view yields as they come)
and `holding_model` for the few direct ones. A mitigation is applied with
hooks inside a computation, so no other computation ever sees it, even one
that starts while a cancelled one is still finishing its step. Their callbacks
raise `SamplingCancelled` once the stop flag is set, which ends a run within
one step (Gradio's `cancels=` alone cannot interrupt torch). A cancel stops only the event it was sent for
(`cancel_route`), never the session's next run.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import fastapi
import gradio as gr
import torch
from fastapi.routing import APIRoute
from gradio.data_classes import CancelBody
from gradio.route_utils import API_PREFIX
from gradio.server_messages import ProcessCompletedMessage
from gradio.utils import safe_aclose_iterator

from analysis.dori import DoriStep
from analysis.export import RunRecord
from analysis.model import ModelHandle
from analysis.progress import TaskProgress
from analysis.sampling import DenoisingStep, SamplingCancelled
from analysis.tasks import run_task
from dori_ui import MODEL_CONCURRENCY_ID
from dori_ui.session import AppContext, Session

# Held by every computation on a model: the app runs one at a time (re-entrant: a computation's callback may run
# a nested one, e.g. the Dori search's previews).
MODEL_LOCK = threading.RLock()


@contextmanager
def holding_model(session: Session) -> Iterator[None]:
    """Run the block as the app's one model computation, after any other has stopped; the session's stop flag
    stops it where it checks `check_stop`."""
    with MODEL_LOCK:
        check_stop(session)
        yield


def check_stop(session: Session) -> None:
    """Raise `SamplingCancelled` once the session's run was stopped (Stop button, cancelled event, time limit)."""
    if session.stop_requested:
        raise SamplingCancelled


@dataclass
class Stopped:
    """The last thing `stream_task` yields when the session's stop flag ended the run."""


@dataclass
class _Finished:
    record: RunRecord | None = None
    error: BaseException | None = None


def stream_task(handle: ModelHandle, kind: str, config: dict, inputs: dict[str, torch.Tensor],
                session: Session) -> Iterator[object]:
    """Yield the run's events as they come, then its `RunRecord` (or `Stopped`); its errors are raised here,
    a bad setting (ValueError) as a gr.Error."""
    events: queue.Queue = queue.Queue()

    def callback(event: object) -> None:
        check_stop(session)
        events.put(event)

    def work() -> None:
        try:
            with holding_model(session):
                events.put(_Finished(record=run_task(handle, kind, config, callback=callback, inputs=inputs)))
        except BaseException as err:  # noqa: BLE001 - handed to the consuming thread, which raises it
            events.put(_Finished(error=err))

    worker = threading.Thread(target=work, name=f"dori-{kind}", daemon=True)
    worker.start()
    try:
        while True:
            event = events.get()
            if not isinstance(event, _Finished):
                yield event
                continue
            if isinstance(event.error, SamplingCancelled):
                yield Stopped()
            elif isinstance(event.error, ValueError):
                raise gr.Error(str(event.error)) from event.error
            elif isinstance(event.error, (torch.cuda.OutOfMemoryError, MemoryError)):
                raise out_of_memory(handle) from event.error
            elif event.error is not None:
                raise event.error
            else:
                yield event.record
            return
    finally:
        # A consumer that stops listening (closed page, cancelled event) stops the run too, and waits for it:
        # the next model event must not start while this one still has the model (and maybe a mask on it).
        if worker.is_alive():
            session.stop_requested = True
            worker.join()


def request_stop(session: Session) -> str:
    """The Stop buttons' event: the session's running `stream_task` ends after its current step."""
    session.stop_requested = True
    return "Stopping after the current step…"


def progress_of(event: object) -> tuple[tuple[int, int | None], str, str] | None:
    """(done, total), description and unit for gr.Progress, for any event `run_task` streams; None for others."""
    if isinstance(event, DenoisingStep):
        return (event.index + 1, event.total), "Denoising", "steps"
    if isinstance(event, DoriStep):
        return (event.index + 1, event.total), "Dori search", "steps"
    if isinstance(event, TaskProgress):
        return (event.done, event.total), f"{event.stage}: {event.message}".rstrip(": "), event.unit
    return None


def report_to(progress) -> Callable[[object], None]:
    """A `run_task` callback that shows its progress on a `gr.Progress`."""

    def callback(event: object) -> None:
        if (shown := progress_of(event)) is not None:
            done_total, description, unit = shown
            progress(done_total, desc=description, unit=unit)

    return callback


def run_or_error(handle: ModelHandle, kind: str, config: dict, inputs: dict[str, torch.Tensor], session: Session,
                 callback: Callable[[object], None] | None = None) -> RunRecord:
    """`run_task` as the app's model computation (stopped by the session's stop flag), with a bad setting
    (ValueError) shown to the user as a gr.Error."""

    def checked(event: object) -> None:
        check_stop(session)
        if callback is not None:
            callback(event)

    try:
        with holding_model(session):
            return run_task(handle, kind, config, callback=checked, inputs=inputs)
    except ValueError as err:
        raise gr.Error(str(err)) from err
    except (torch.cuda.OutOfMemoryError, MemoryError) as err:
        raise out_of_memory(handle) from err


def out_of_memory(handle: ModelHandle) -> gr.Error:
    """The message for a run that did not fit in memory, after freeing what the failed run cached."""
    if handle.device.type == "cuda":
        torch.cuda.empty_cache()
    where = "GPU" if handle.device.type == "cuda" else "machine"
    return gr.Error(f"The {where} ran out of memory for this run. Nothing was kept; try fewer seeds, a smaller "
                    "batch or fewer triggers (or a smaller dtype, app.py --dtype float16).")


def model_event(handler: Callable, context: AppContext, outputs: Sequence = ()) -> Callable:
    """`handler` (a function or generator of a view that runs the model, taking the `Session` among its
    arguments) as Gradio should call it: in a worker thread, stopped when the event is cancelled or runs past
    `context.max_run_seconds`, and finished only when its computation has stopped.

    A stopped run is no error: its `outputs` stay as they were, but for a Stop button's status among them, which
    says it stopped (else a warning does). Gradio reads the wrapper's signature through `functools.wraps`, so
    `gr.Progress` and other special arguments reach the handler as before.
    """
    if inspect.isgeneratorfunction(handler):
        @functools.wraps(handler)
        async def stream(*args, **kwargs):
            session, deadline = _started(args, context)
            steps = handler(*args, **kwargs)
            try:
                while (item := await _until_stopped(session, deadline, next, steps, _END)) is not _END:
                    yield item
            except SamplingCancelled:
                yield _stopped(session, deadline, context, outputs)
                return
            finally:
                await asyncio.to_thread(steps.close)  # runs its `finally`s (stream_task joins its worker there)
            _warn_if_timed_out(session, deadline, context)

        return stream

    @functools.wraps(handler)
    async def call(*args, **kwargs):
        session, deadline = _started(args, context)
        try:
            result = await _until_stopped(session, deadline, handler, *args, **kwargs)
        except SamplingCancelled:
            return _stopped(session, deadline, context, outputs)
        _warn_if_timed_out(session, deadline, context)
        return result

    return call


def on_model(listener: Callable, handler: Callable, context: AppContext, **kwargs):
    """Register `handler` as a model event on `listener` (e.g. `button.click`): wrapped by `model_event` and
    queued behind the other model events, one at a time."""
    return listener(model_event(handler, context, kwargs.get("outputs") or ()), concurrency_id=MODEL_CONCURRENCY_ID,
                    concurrency_limit=1, **kwargs)


_END = object()  # what `next` returns at a generator's end, in place of StopIteration (which a Future cannot raise)


def _started(args: tuple, context: AppContext) -> tuple[Session, float]:
    session = next((arg for arg in args if isinstance(arg, Session)), None)
    if session is None:
        raise TypeError("a model event's handler takes the session's state among its inputs")
    session.stop_requested = False
    return session, time.monotonic() + context.max_run_seconds


async def _until_stopped(session: Session, deadline: float, function: Callable, *args, **kwargs):
    """`function(*args)` in a worker thread. If the event is cancelled, or the deadline passes, the session's
    stop flag is set and the call still awaited: the model is free again only when this returns or raises."""
    work = asyncio.ensure_future(asyncio.to_thread(function, *args, **kwargs))
    try:
        return await asyncio.wait_for(asyncio.shield(work), max(deadline - time.monotonic(), 0))
    except TimeoutError:
        session.stop_requested = True
        return await work
    except asyncio.CancelledError:
        session.stop_requested = True
        await asyncio.wait([work])
        raise


def _stopped(session: Session, deadline: float, context: AppContext, outputs: Sequence):
    """What a stopped event answers: its outputs left as they were (a stop is no error: no output shows one) but
    for a Stop button's status among them, which says it stopped; without one, a warning says so."""
    if _warn_if_timed_out(session, deadline, context):
        return gr.skip()
    # Looked up now: a view registers its Stop button after its run event.
    status = next((output for output in outputs if any(output is shown for shown in context.stop_statuses)), None)
    if status is None:
        gr.Warning("Stopped.")
        return gr.skip()
    return {status: "Stopped."}


def _warn_if_timed_out(session: Session, deadline: float, context: AppContext) -> bool:
    """Warn (a message that stays until closed) when the time limit stopped the run; a view that ended on its own
    after the stop has said so in its outputs."""
    timed_out = session.stop_requested and time.monotonic() >= deadline
    if timed_out:
        gr.Warning(f"Stopped: this run took longer than the app's limit of {context.max_run_seconds:g} s per "
                   "request (app.py --max-run-seconds). Choose fewer seeds or steps, or ask the app's host.",
                   duration=None)
    return timed_out


def run_and_stop_buttons(label: str, run_id: str, stop_id: str) -> tuple[gr.Button, gr.Button]:
    """A long run's primary button with its Stop button beside it (`on_stop` registers what Stop does)."""
    with gr.Row():
        return (gr.Button(label, variant="primary", elem_id=run_id),
                gr.Button("Stop", variant="stop", elem_id=stop_id))


def on_stop(stop_button: gr.Button, context: AppContext, status: gr.components.Component, view: str) -> None:
    """Stop ends the session's running computation after its current step and says so in `status` (endpoint
    `{view}_stop`). Not on the model's concurrency id: it must run while the computation holds the model."""
    context.stop_statuses.append(status)
    stop_button.click(request_stop, inputs=context.session, outputs=status, api_name=f"{view}_stop",
                      concurrency_limit=None)


async def cancel_event(body: CancelBody, request: fastapi.Request) -> dict:
    """Gradio's `/cancel`, cancelling only the running event whose id it names.

    Gradio's own cancels every running event of the session's function: a cancel that arrived after its run had
    ended (a slow network, a loaded server) stopped the session's next run of the same view. The rest is what
    Gradio's does: the event leaves the queue, a waiting client is told it completed, a stream is closed."""
    app = request.app
    name = f"{body.session_hash}_{body.fn_index}{GRADIO_TASK_SEPARATOR}{body.event_id}"
    tasks = [task for task in asyncio.all_tasks() if task.get_name() == name]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    queue = app.get_blocks()._queue
    session_open = body.session_hash in queue.pending_messages_per_session
    event_running = body.event_id in queue.pending_event_ids_session.get(body.session_hash, {})
    await queue.remove_from_queue(body.event_id)
    if session_open and event_running:
        queue.pending_messages_per_session[body.session_hash].put_nowait(
            ProcessCompletedMessage(output={}, success=True, event_id=body.event_id))
    if body.event_id in app.iterators:
        async with app.lock:
            try:
                await safe_aclose_iterator(app.iterators[body.event_id])
            except Exception:  # noqa: BLE001 - a stream that fails to close is dropped all the same, as Gradio does
                pass
            del app.iterators[body.event_id]
            app.iterators_to_reset.add(body.event_id)
    return {"success": True}


# How Gradio names an event's task (`gradio.utils.set_task_name`): "{session}_{fn_index}<gradio-sep>{event_id}".
GRADIO_TASK_SEPARATOR = "<gradio-sep>"


def cancel_route() -> APIRoute:
    """`cancel_event` at Gradio's cancel path: given to the app's FastAPI constructor (`launch_options`), it is
    matched before the route Gradio adds later."""
    return APIRoute(f"{API_PREFIX}/cancel", cancel_event, methods=["POST"])
