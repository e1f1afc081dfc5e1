"""Run an analysis in a worker thread and stream what it reports, so a view can yield while it runs and stop it.

`stream_task` runs `analysis.tasks.run_task` with a callback that queues every
event (`DenoisingStep`, `DoriStep`, `TaskProgress`) and raises
`SamplingCancelled` once the session's stop flag is set, so a Stop button ends
the run within one step (Gradio's `cancels=` alone cannot interrupt torch).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import gradio as gr
import torch

from analysis.dori import DoriStep
from analysis.export import RunRecord
from analysis.model import ModelHandle
from analysis.progress import TaskProgress
from analysis.sampling import DenoisingStep, SamplingCancelled
from analysis.tasks import run_task
from dori_ui.session import Session


@dataclass
class Stopped:
    """The last thing `stream_task` yields when the session's stop flag ended the run."""


@dataclass
class _Finished:
    record: RunRecord | None = None
    error: BaseException | None = None


def stream_task(handle: ModelHandle, kind: str, config: dict, inputs: dict[str, torch.Tensor], session: Session,
                extra: Callable[[object], object | None] | None = None) -> Iterator[object]:
    """Yield the run's events as they come, then its `RunRecord` (or `Stopped`); its errors are raised here,
    a bad setting (ValueError) as a gr.Error.

    `extra(event)` runs in the worker thread, inside the run (e.g. with its
    mask applied); what it returns, if not None, is yielded after the event.
    """
    events: queue.Queue = queue.Queue()
    session.stop_requested = False

    def callback(event: object) -> None:
        if session.stop_requested:
            raise SamplingCancelled
        events.put(event)
        if extra is not None and (added := extra(event)) is not None:
            events.put(added)

    def work() -> None:
        try:
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
        return (event.done, event.total), f"{event.stage}: {event.message}".rstrip(": "), "rounds"
    return None


def report_to(progress) -> Callable[[object], None]:
    """A `run_task` callback that shows its progress on a `gr.Progress`."""

    def callback(event: object) -> None:
        if (shown := progress_of(event)) is not None:
            done_total, description, unit = shown
            progress(done_total, desc=description, unit=unit)

    return callback


def run_or_error(handle: ModelHandle, kind: str, config: dict, inputs: dict[str, torch.Tensor],
                 callback: Callable[[object], None] | None = None) -> RunRecord:
    """`run_task`, with a bad setting (ValueError) shown to the user as a gr.Error."""
    try:
        return run_task(handle, kind, config, callback=callback, inputs=inputs)
    except ValueError as err:
        raise gr.Error(str(err)) from err


def run_and_stop_buttons(label: str, run_id: str, stop_id: str) -> tuple[gr.Button, gr.Button]:
    """A long run's primary button with its Stop button beside it (Stop calls the view's `request_stop`)."""
    with gr.Row():
        return (gr.Button(label, variant="primary", elem_id=run_id),
                gr.Button("Stop", variant="stop", elem_id=stop_id))
