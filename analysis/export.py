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
    recorded = load_export("replicate.zip")   # `analysis.rerun.rerun` runs it again; compare_metrics compares
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from analysis.images import to_uint8
from analysis.limits import MAX_EXPORT_DECODED_BYTES

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
TABLE_FILE = "table.csv"
TENSORS_FILE = "tensors.safetensors"
IMAGES_FOLDER = "images/"
INPUT_PREFIX = "input."  # tensors a rerun passes back to `run_task` as `inputs`
VERSIONED_PACKAGES = ("dori-lab", "torch", "diffusers", "transformers")
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# What `load_export` reads at most: an export from elsewhere is untrusted input.
MAX_MEMBERS = 10_000
MAX_JSON_BYTES = 16 * 2**20  # config.json, metrics.json, table.csv
MAX_JSON_DEPTH = 32
MAX_IMAGE_BYTES = 16 * 2**20
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_TENSORS_BYTES = 2 * 2**30


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


def _read_member(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """A member's bytes, refusing one that unpacks to more than `limit` bytes before reading it."""
    size = archive.getinfo(name).file_size
    if size > limit:
        raise ValueError(f"{name} unpacks to {size:,} bytes; an export's {name} may hold at most {limit:,}")
    return archive.read(name)  # zipfile stops at the declared size and checks the CRC


def _json_member(archive: zipfile.ZipFile, name: str) -> dict:
    try:
        value = json.loads(_read_member(archive, name, MAX_JSON_BYTES))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{name} is not readable JSON ({type(err).__name__})") from err
    if not isinstance(value, dict):
        raise ValueError(f"{name} must hold a JSON object, got {type(value).__name__}")
    _check_depth(value, name)
    return value


def _check_depth(value, what: str, depth: int = 0) -> None:
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        _check_depth(item, what, depth + 1)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_pixels(archive: zipfile.ZipFile, name: str) -> int:
    """Width × height from a PNG member's header (its first 24 bytes), without decompressing its pixels;
    ValueError above MAX_IMAGE_PIXELS."""
    with archive.open(name) as member:
        head = member.read(24)
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise ValueError(f"{name} is not a readable PNG (no PNG header)")
    width, height = struct.unpack(">II", head[16:24])
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{name} is {width}×{height} pixels; an export's images may have at most {MAX_IMAGE_PIXELS:,}")
    return width * height


def _check_decoded_size(path: Path, archive: zipfile.ZipFile, images: list[str], names: set[str]) -> None:
    """ValueError when the export's images (as the float32 tensors they become) and tensors would take more than
    MAX_EXPORT_DECODED_BYTES together: each member is bounded on its own, but many can add up."""
    decoded = sum(_png_pixels(archive, name) for name in images) * 3 * 4
    decoded += archive.getinfo(TENSORS_FILE).file_size if TENSORS_FILE in names else 0  # safetensors: raw bytes
    if decoded > MAX_EXPORT_DECODED_BYTES:
        raise ValueError(f"{path}: its images and tensors take {decoded:,} bytes once decoded; an export may take "
                         f"at most {MAX_EXPORT_DECODED_BYTES:,}")


def _image_member(archive: zipfile.ZipFile, name: str) -> torch.Tensor:
    data = _read_member(archive, name, MAX_IMAGE_BYTES)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:  # its size checked by `_png_pixels`
            array = np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:  # UnidentifiedImageError is an OSError
        raise ValueError(f"{name} is not a readable PNG ({err})") from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1


def load_export(path: str | Path) -> RunRecord:
    """Read a ZIP written by `save_export`. Raises ValueError for anything else, naming what is wrong.

    Nothing in the file is trusted: every member's unpacked size is checked
    before it is read, JSON nesting and image sizes are bounded, so is the size
    of all images and tensors once decoded (`analysis.limits`), and a corrupt
    member (bad CRC, broken tensors or PNG) is a ValueError, not a crash.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no export file at {path.resolve()}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a ZIP file: expected an export written by Dori Lab")
    try:
        with zipfile.ZipFile(path) as archive:
            return _read_archive(path, archive)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:  # a bad CRC, a broken header or compressed stream
        raise ValueError(f"{path} is a damaged ZIP file ({err})") from err


def _read_archive(path: Path, archive: zipfile.ZipFile) -> RunRecord:
    names = archive.namelist()
    if len(names) > MAX_MEMBERS:
        raise ValueError(f"{path} holds {len(names)} files; an export holds at most {MAX_MEMBERS}")
    names = set(names)
    if CONFIG_FILE not in names:
        raise ValueError(f"{path} has no {CONFIG_FILE}: it is not a Dori Lab export")
    header = _json_member(archive, CONFIG_FILE)
    metrics = _json_member(archive, METRICS_FILE) if METRICS_FILE in names else {}
    missing = [key for key in ("format", "kind", "model", "config") if key not in header]
    if missing:
        raise ValueError(f"{path}: {CONFIG_FILE} lacks {', '.join(missing)}")
    if header["format"] != FORMAT_VERSION:
        raise ValueError(f"{path}: export format {header['format']!r}, this version reads {FORMAT_VERSION}")
    if not all(isinstance(header[key], str) for key in ("kind", "model")) or not isinstance(header["config"], dict):
        raise ValueError(f"{path}: {CONFIG_FILE}'s kind and model must be strings and its config a JSON object")
    table = []
    if TABLE_FILE in names:
        try:
            table = _rows_from_csv(_read_member(archive, TABLE_FILE, MAX_JSON_BYTES).decode())
        except (UnicodeDecodeError, csv.Error) as err:
            raise ValueError(f"{TABLE_FILE} is not a readable table ({err})") from err
    image_names = sorted(name for name in names if name.startswith(IMAGES_FOLDER) and name.endswith(".png"))
    _check_decoded_size(path, archive, image_names, names)  # before anything is decoded
    images = {name[len(IMAGES_FOLDER):-len(".png")]: _image_member(archive, name) for name in image_names}
    tensors = {}
    if TENSORS_FILE in names:
        try:
            tensors = load_safetensors(_read_member(archive, TENSORS_FILE, MAX_TENSORS_BYTES))
        except Exception as err:  # safetensors raises its own SafetensorError (and others) for a broken file
            raise ValueError(f"{TENSORS_FILE} is not a readable safetensors file ({err})") from err
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
