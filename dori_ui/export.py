"""The "Export ZIP" button of every view: the view's last run, kept in session state, saved by `analysis.export`.

Element ids: `{view}-export` (the button), `{view}-export-file` (a compact button that downloads the ZIP once
it is written; no empty file box waits below a view).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import gradio as gr

from analysis.export import save_export
from dori_ui.session import AppContext, Session


def build_export(context: AppContext, view: str, run_label: str | None = None) -> gr.DownloadButton:
    """A button that writes the session's last `view` run as a ZIP that `dori rerun` reproduces.

    `run_label` names what makes that run, where a view has more than one (e.g. a button's label).
    """
    with gr.Row():
        button = gr.Button("Export ZIP", elem_id=f"{view}-export", size="sm", scale=0)
        file = gr.DownloadButton("Download ZIP", elem_id=f"{view}-export-file", size="sm", scale=0)

    def export(state: Session) -> str:
        record = state.records.get(view)
        if record is None:
            raise gr.Error(f"Nothing to export yet: run {run_label or f'the {view} view'} first.")
        # A folder of its own per export: two sessions never overwrite each other's file. Gradio serves a copy,
        # so the session's previous export of this view can go, and the last one goes with the session.
        folder = Path(tempfile.mkdtemp(prefix="dori-export-"))
        try:
            path = save_export(record, folder / f"dori-{view}-{record.kind}.zip")
        except ValueError as err:  # e.g. a search that diverged to NaN
            shutil.rmtree(folder, ignore_errors=True)
            raise gr.Error(f"This run cannot be exported: {err}") from err
        previous = state.export_folders.get(view)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        state.export_folders[view] = folder
        return str(path)

    button.click(export, inputs=context.session, outputs=file, api_name=f"export_{view}")
    return file


def remove_exports(session: Session) -> None:
    """The session state's delete callback: its export folders go when Gradio forgets the session."""
    for folder in session.export_folders.values():
        shutil.rmtree(folder, ignore_errors=True)
    session.export_folders.clear()
