"""The "Export ZIP" button of every view: the view's last run, kept in session state, saved by `analysis.export`.

Element ids: `{view}-export` (the button), `{view}-export-file` (the ZIP to download).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from analysis.export import save_export
from dori_ui.session import AppContext, Session


def build_export(context: AppContext, view: str, run_label: str | None = None) -> gr.File:
    """A button that writes the session's last `view` run as a ZIP that `dori rerun` reproduces.

    `run_label` names what makes that run, where a view has more than one (e.g. a button's label).
    """
    with gr.Row():
        button = gr.Button("Export ZIP", elem_id=f"{view}-export", size="sm", scale=0)
        file = gr.File(label="Export (config, images, table, tensors)", elem_id=f"{view}-export-file",
                       interactive=False, height=90)

    def export(state: Session) -> str:
        record = state.records.get(view)
        if record is None:
            raise gr.Error(f"Nothing to export yet: run {run_label or f'the {view} view'} first.")
        # A folder of its own per export: two sessions never overwrite each other's file.
        folder = Path(tempfile.mkdtemp(prefix="dori-export-"))
        return str(save_export(record, folder / f"dori-{view}-{record.kind}.zip"))

    button.click(export, inputs=context.session, outputs=file, api_name=f"export_{view}")
    return file
