"""One analysis run as one ZIP file: what the app's Export button and `dori ... --export` write, `dori rerun` reads.

The ZIP holds

* `config.json`: `format`, `kind`, `model` (the handle's name), `config` (every
  parameter and seed, enough to run it again) and the package versions;
* `metrics.json`: the numbers a rerun must reproduce;
* `table.csv`: the run's table (non-string cells JSON-encoded, so they read back as numbers);
* `images/NAME.png`: 8-bit RGB pictures of `[3, H, W]` tensors in [-1, 1];
* `tensors.safetensors`: embeddings, masks and the inputs a rerun needs (names starting `input.`).

    record = run_task(handle, "replicate", {"image": 0})
    save_export(record, "replicate.zip")
    recorded, reproduced = rerun("replicate.zip")
    mismatches = compare_metrics(recorded.metrics, reproduced.metrics)
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import re
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from analysis.images import to_uint8

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
TABLE_FILE = "table.csv"
TENSORS_FILE = "tensors.safetensors"
IMAGES_FOLDER = "images/"
INPUT_PREFIX = "input."  # tensors a rerun passes back to `run_task` as `inputs`
VERSIONED_PACKAGES = ("dori-lab", "torch", "diffusers", "transformers")
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class RunRecord:
    """Everything one run produced, and the configuration that produced it."""

    kind: str  # "replicate", "localize", "attack", "sweep", "attribute", ...
    model: str  # ModelHandle.name: "bundled demo model", a folder or a hub id
    config: dict  # JSON values only: every parameter and seed, defaults filled in
    metrics: dict = field(default_factory=dict)  # JSON numbers (nested dicts and lists allowed) a rerun reproduces
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [3, H, W] in [-1, 1]
    table: list[dict] = field(default_factory=list)  # rows of scalar cells
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # embeddings, masks, `input.*`

    def inputs(self) -> dict[str, torch.Tensor]:
        """The tensors that were inputs of the run (`input.NAME` -> NAME), to pass to `run_task` again."""
        return {name.removeprefix(INPUT_PREFIX): tensor for name, tensor in self.tensors.items()
                if name.startswith(INPUT_PREFIX)}


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _check_name(name: str, what: str) -> None:
    if not SAFE_NAME.match(name):
        raise ValueError(f"{what} name {name!r} may only contain letters, digits, '_', '-' and '.'")


def _png_bytes(image: torch.Tensor, name: str) -> bytes:
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image {name!r} must be [3, H, W] in [-1, 1], got shape {tuple(image.shape)}")
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image[None])[0].numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_from_png(data: bytes) -> torch.Tensor:
    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1


def _csv_text(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: value if isinstance(value, str) else json.dumps(value) for key, value in row.items()})
    return buffer.getvalue()


def _parse_cell(text: str):
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if value is None or isinstance(value, (bool, int, float)) else text


def _rows_from_csv(text: str) -> list[dict]:
    return [{key: _parse_cell(value) for key, value in row.items() if value != ""}
            for row in csv.DictReader(io.StringIO(text))]


def _json_text(value, what: str) -> str:
    try:
        # allow_nan=False: a NaN would not read back as the number a rerun is compared with.
        return json.dumps(value, indent=1, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}: cannot be written as JSON ({err}); NaN, infinity and tensors are not allowed") from err


def save_export(record: RunRecord, path: str | Path) -> Path:
    """Write `record` as one ZIP at `path` (parent folders are created) and return the path."""
    from analysis.tasks import TASKS  # tasks imports this module

    if record.kind not in TASKS:
        raise ValueError(f"unknown run kind {record.kind!r}; known kinds: {sorted(TASKS)}")
    for name in [*record.images, *record.tensors]:
        _check_name(name, "image or tensor")
    header = dict(format=FORMAT_VERSION, kind=record.kind, model=record.model, config=record.config,
                  versions=package_versions())
    config_text, metrics_text = _json_text(header, CONFIG_FILE), _json_text(record.metrics, METRICS_FILE)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(CONFIG_FILE, config_text)
        archive.writestr(METRICS_FILE, metrics_text)
        if record.table:
            archive.writestr(TABLE_FILE, _csv_text(record.table))
        for name, image in record.images.items():
            archive.writestr(f"{IMAGES_FOLDER}{name}.png", _png_bytes(image, name))
        if record.tensors:
            tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in record.tensors.items()}
            archive.writestr(TENSORS_FILE, save_safetensors(tensors))
    return path


def load_export(path: str | Path) -> RunRecord:
    """Read a ZIP written by `save_export`. Raises ValueError for anything else, naming what is wrong."""
    from analysis.tasks import TASKS  # tasks imports this module

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no export file at {path.resolve()}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a ZIP file: expected an export written by Dori Lab")
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        if CONFIG_FILE not in names:
            raise ValueError(f"{path} has no {CONFIG_FILE}: it is not a Dori Lab export")
        try:
            header = json.loads(archive.read(CONFIG_FILE))
            metrics = json.loads(archive.read(METRICS_FILE)) if METRICS_FILE in names else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: unreadable JSON ({err})") from err
        missing = [key for key in ("format", "kind", "model", "config") if key not in header]
        if missing:
            raise ValueError(f"{path}: {CONFIG_FILE} lacks {', '.join(missing)}")
        if header["format"] != FORMAT_VERSION:
            raise ValueError(f"{path}: export format {header['format']!r}, this version reads {FORMAT_VERSION}")
        if header["kind"] not in TASKS:
            raise ValueError(f"{path}: unknown run kind {header['kind']!r}; known kinds: {sorted(TASKS)}")
        table = _rows_from_csv(archive.read(TABLE_FILE).decode()) if TABLE_FILE in names else []
        images = {name[len(IMAGES_FOLDER):-len(".png")]: _image_from_png(archive.read(name))
                  for name in sorted(names) if name.startswith(IMAGES_FOLDER) and name.endswith(".png")}
        tensors = load_safetensors(archive.read(TENSORS_FILE)) if TENSORS_FILE in names else {}
    return RunRecord(kind=header["kind"], model=header["model"], config=header["config"], metrics=metrics,
                     images=images, table=table, tensors=tensors)


def _flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        return {key: leaf for name, item in value.items()
                for key, leaf in _flatten(item, f"{prefix}.{name}" if prefix else str(name)).items()}
    if isinstance(value, list):
        return {key: leaf for index, item in enumerate(value) for key, leaf in _flatten(item, f"{prefix}[{index}]").items()}
    return {prefix: value}


def compare_metrics(recorded: dict, reproduced: dict, rtol: float = 1e-3, atol: float = 1e-4) -> list[dict]:
    """Every metric of either run: `{"metric", "recorded", "reproduced", "match"}`; numbers match within tolerance."""
    first, second = _flatten(recorded), _flatten(reproduced)
    rows = []
    for key in dict.fromkeys([*first, *second]):
        a, b = first.get(key), second.get(key)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
        match = math.isclose(a, b, rel_tol=rtol, abs_tol=atol) if numbers else a == b
        rows.append(dict(metric=key, recorded=a, reproduced=b, match=match))
    return rows


def rerun(path: str | Path, device: str | torch.device = "cpu") -> tuple[RunRecord, RunRecord]:
    """Load an export, load the model it names (on `device`, in the recorded dtype, with the recorded memorized
    set, reference prompts and replication metric) and run it again.

    Returns (recorded, reproduced); `compare_metrics` tells whether the numbers agree.
    """
    from analysis.metrics import replication_metric
    from analysis.model import load_model
    from analysis.tasks import BUNDLED_MODEL_NAME, run_task

    recorded = load_export(path)
    source = None if recorded.model == BUNDLED_MODEL_NAME else recorded.model
    metric = recorded.config.get("replication")
    handle = load_model(source, device=device, dtype=recorded.config.get("dtype", "float32"),
                        memorized=recorded.config.get("memorized_set"),
                        reference_prompts=recorded.config.get("reference_prompts"),
                        replication_metric=None if metric is None else replication_metric(**metric, device=device))
    reproduced = run_task(handle, recorded.kind, recorded.config, inputs=recorded.inputs())
    return recorded, reproduced
