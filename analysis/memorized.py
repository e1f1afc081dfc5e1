"""Memorized training images and prompt lists: what a model is analysed against.

`load_memorized_set(folder, tokenizer, image_size)` reads a memorized set in
one of two formats, through the same checks:

* a Hugging Face `imagefolder`: images plus `metadata.csv` or
  `metadata.jsonl` with a `file_name` column (a path inside the folder) and a
  caption column, `text` or `caption`. Other columns (e.g. `url`, `group`)
  are kept with each image as its `metadata`;
* a model folder's `memorized.json` sidecar (the bundled model's format):
  `captions` and a safetensors file of images at the model's size.

Every image is converted to RGB, centre-cropped to a square and resized
(bicubic) to the model's resolution, and kept in pixels, `[3, S, S]` in
[-1, 1]: replication compares decoded generations with it, and the analyses
that need a latent target (Dori, fine-tuning) encode it with the model's VAE
once per run (`ModelHandle.encode_images`). A set with a missing metadata file
or column, a missing or undecodable image, an empty caption, a caption longer
than the tokenizer reads or holding a NUL, no rows, an unreadable file (not
UTF-8, a CSV field over csv's limit, JSON nested too deeply, a sidecar missing
keys or of the wrong type), more than `MAX_SET_ROWS` rows or an image over
`MAX_SET_IMAGE_PIXELS` raises `MemorizedSetError` naming the file and row;
nothing is returned half-loaded. A set is not trusted: every file it names
(`file_name`, the sidecar's `images_file`) and its metadata file itself must
lie inside its folder, symlinks followed, before anything is read from them.

`read_prompt_list(path)` reads a prompt list (CSV or JSON); `REFERENCE_PROMPTS_FILE`, the 500 LAION prompts
SD v1.4 does not memorize, is every model's non-memorized reference set unless it has its own.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import PreTrainedTokenizerBase

from analysis.limits import MAX_PROMPT_CHARS, MAX_SET_IMAGE_PIXELS, MAX_SET_ROWS
from analysis.paths import REPO_ROOT

MEMORIZED_FILE = "memorized.json"  # a model folder's sidecar: its memorized images, prompts and settings

SD14_MEMORIZATION_DIR = REPO_ROOT / "assets" / "sd14_memorization"
SD14_MEMORIZED_FILE = SD14_MEMORIZATION_DIR / "memorized_laion_prompts.csv"
REFERENCE_PROMPTS_FILE = SD14_MEMORIZATION_DIR / "unmemorized_laion_prompts.csv"
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
CAPTION_COLUMNS = ("text", "caption")
# Columns a prompt list's prompt may be in (the shipped SD v1.4 lists call it `Caption`).
PROMPT_COLUMNS = ("prompt", "caption", "Caption", "text")


@dataclass
class MemorizedImage:
    """A training image known to be memorized, with the caption that triggers it."""

    caption: str
    image: torch.Tensor  # [3, H, W] in [-1, 1]
    metadata: dict = field(default_factory=dict)  # an imagefolder row's other columns (file_name, url, group, ...)


class MemorizedSetError(ValueError):
    """A memorized set that cannot be used; the message names the file and row."""


def readable_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """How many tokens of a text the text encoder reads: two of its positions hold the start and end markers."""
    return tokenizer.model_max_length - 2


def token_count(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Tokens of `text` without the start and end markers."""
    return len(tokenizer(text).input_ids) - 2


def fit_image(picture: Image.Image, size: int) -> torch.Tensor:
    """Any PIL image -> `[3, size, size]` in [-1, 1]: RGB, centre-cropped to a square, resized bicubically."""
    square = ImageOps.fit(picture.convert("RGB"), (size, size), Image.BICUBIC, centering=(0.5, 0.5))
    pixels = torch.frombuffer(bytearray(square.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1


def set_file(folder: Path, name: object, where: str, what: str) -> Path:
    """`folder / name` resolved, when it is a file inside `folder` (symlinks followed); MemorizedSetError otherwise,
    before anything is read from it."""
    path = (folder / str(name)).resolve() if isinstance(name, str) and name else None
    if path is None or not path.is_relative_to(folder.resolve()):
        raise MemorizedSetError(f"{where}: {what} {shown_name(name)} is not a file inside {folder}")
    if not path.is_file():
        raise MemorizedSetError(f"{where}: no {what} {path}")
    return path


def shown_name(value: object) -> str:
    """A value of a set's file for a message, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise MemorizedSetError(f"{path}: not UTF-8 text (byte {err.start})") from None


def _json(path: Path, error: type[ValueError]):
    """The JSON value in `path`; `error` naming the file when it is not readable JSON (or nested too deeply)."""
    try:
        return json.loads(_text(path))
    except (json.JSONDecodeError, RecursionError) as err:
        raise error(f"{path}: not readable JSON ({type(err).__name__})") from None


def _too_many(path: Path, count: int) -> None:
    if count > MAX_SET_ROWS:
        raise MemorizedSetError(f"{path}: more than {MAX_SET_ROWS} rows; a memorized set holds at most {MAX_SET_ROWS} "
                                "images")


def _csv_rows(path: Path) -> tuple[list[dict], list[str]]:
    reader = csv.DictReader(io.StringIO(_text(path), newline=""))
    rows = []
    try:
        for row in reader:
            rows.append(row)
            _too_many(path, len(rows))
    except csv.Error as err:  # e.g. a field larger than csv's field size limit
        raise MemorizedSetError(f"{path} row {len(rows) + 1}: not a readable CSV row ({err})") from None
    return rows, list(reader.fieldnames or [])


def _jsonl_rows(path: Path) -> tuple[list[dict], list[str]]:
    rows = []
    for number, line in enumerate(_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:  # RecursionError: nested too deeply
            reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
            raise MemorizedSetError(f"{path} line {number}: not a JSON object: {reason}") from None
        if not isinstance(row, dict):
            raise MemorizedSetError(f"{path} line {number}: not a JSON object")
        rows.append(row)
        _too_many(path, len(rows))
    return rows, list(dict.fromkeys(key for row in rows for key in row))


def _metadata_rows(folder: Path) -> tuple[Path, list[dict]]:
    found = [name for name in METADATA_FILES if (folder / name).is_file()]
    if not found:
        raise MemorizedSetError(f"{folder}: no {' or '.join(METADATA_FILES)} (an imagefolder memorized set lists its "
                                f"images there, with columns file_name and {' or '.join(CAPTION_COLUMNS)})")
    if len(found) > 1:
        raise MemorizedSetError(f"{folder}: both {' and '.join(METADATA_FILES)}; keep one")
    set_file(folder, found[0], str(folder), "metadata file")  # a symlink to a file elsewhere is refused
    path = folder / found[0]
    rows, columns = _csv_rows(path) if path.suffix == ".csv" else _jsonl_rows(path)
    if not rows:
        raise MemorizedSetError(f"{path}: no rows")
    captions = [name for name in CAPTION_COLUMNS if name in columns]
    if "file_name" not in columns or not captions:
        raise MemorizedSetError(f"{path}: needs the columns file_name and {' or '.join(CAPTION_COLUMNS)}; "
                                f"it has {shown_name(columns)}")
    return path, [dict(row, caption=row.get(captions[0])) for row in rows]


def memorized_captions(folder: str | Path) -> list[str]:
    """The captions of an imagefolder set, in order, without decoding its images (to list its prompts)."""
    return [row["caption"] for row in _metadata_rows(Path(folder).expanduser())[1]]


def _imagefolder(folder: Path, size: int) -> list[tuple[str, str, torch.Tensor, dict]]:
    """(where, caption, image, metadata) per row of an imagefolder set."""
    path, rows = _metadata_rows(folder)
    items = []
    for number, row in enumerate(rows, start=1):
        where = f"{path} row {number}"
        if None in row:  # csv.DictReader's key for the fields beyond the header's
            raise MemorizedSetError(f"{where}: more fields than the header has columns")
        name = row.get("file_name")
        image_path = set_file(folder, name, where, "image file")
        try:
            with Image.open(image_path) as picture:
                width, height = picture.size  # from the header, before any pixel is decoded
                if width * height > MAX_SET_IMAGE_PIXELS:
                    raise MemorizedSetError(f"{where}: {image_path.name} is {width}×{height} pixels; a memorized "
                                            f"set's images may have at most {MAX_SET_IMAGE_PIXELS:,}")
                picture.load()
                image = fit_image(picture, size)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise MemorizedSetError(f"{where}: {image_path.name} could not be decoded as an image: {err}") from err
        metadata = {key: value for key, value in row.items()
                    if key not in ("file_name", "caption", *CAPTION_COLUMNS) and value not in (None, "")}
        items.append((where, row["caption"], image, dict(file_name=str(name), **metadata)))
    return items


def read_sidecar(folder: Path) -> tuple[Path, dict]:
    """A model folder's `memorized.json` as a JSON object, read only when it lies inside `folder`; MemorizedSetError
    naming the file otherwise."""
    path = set_file(folder, MEMORIZED_FILE, str(folder), "sidecar")
    meta = _json(path, MemorizedSetError)
    if not isinstance(meta, dict):
        raise MemorizedSetError(f"{path}: must hold a JSON object, got {type(meta).__name__}")
    return folder / MEMORIZED_FILE, meta


def _sidecar(folder: Path, size: int) -> list[tuple[str, str, torch.Tensor, dict]]:
    """(where, caption, image, metadata) per caption of a `memorized.json` sidecar."""
    from safetensors.torch import load_file

    path, meta = read_sidecar(folder)
    captions = meta.get("captions")
    if not isinstance(captions, list) or not isinstance(meta.get("images_file"), str):
        raise MemorizedSetError(f"{path}: needs captions (a list of texts) and images_file (a file name)")
    _too_many(path, len(captions))
    images_path = set_file(folder, meta["images_file"], str(path), "images_file")
    try:
        images = load_file(str(images_path))["images"]
    except Exception as err:  # noqa: BLE001 - safetensors raises its own errors; no "images" tensor
        raise MemorizedSetError(f"{images_path}: not a safetensors file with an 'images' tensor "
                                f"({type(err).__name__})") from None
    if len(images) != len(captions):
        raise MemorizedSetError(f"{path}: {len(captions)} captions but {len(images)} images")
    items = []
    for number, (caption, image) in enumerate(zip(captions, images), start=1):
        where = f"{path} caption {number}"
        if tuple(image.shape) != (3, size, size):
            raise MemorizedSetError(f"{where}: image of shape {tuple(image.shape)}, the model makes [3, {size}, {size}]")
        items.append((where, caption, image, {}))
    return items


def load_memorized_set(folder: str | Path, tokenizer: PreTrainedTokenizerBase, image_size: int) -> list[MemorizedImage]:
    """The memorized images of an imagefolder set or a model folder's sidecar, at `image_size` (module docstring)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MemorizedSetError(f"no memorized set folder at {folder.resolve()}")
    has_metadata = any((folder / name).is_file() for name in METADATA_FILES)
    items = _sidecar(folder, image_size) if (folder / MEMORIZED_FILE).is_file() and not has_metadata \
        else _imagefolder(folder, image_size)
    if not items:
        raise MemorizedSetError(f"{folder}: no memorized images")
    memorized = []
    for where, caption, image, metadata in items:
        if caption is not None and not isinstance(caption, str):
            raise MemorizedSetError(f"{where}: the caption must be text, got {type(caption).__name__}")
        if not caption or not caption.strip():
            raise MemorizedSetError(f"{where}: the caption is empty")
        if "\x00" in caption:
            raise MemorizedSetError(f"{where}: the caption holds a NUL character")
        tokens = token_count(tokenizer, caption)
        if tokens > readable_tokens(tokenizer):
            raise MemorizedSetError(f"{where}: the caption has {tokens} tokens; the text encoder reads at most "
                                    f"{readable_tokens(tokenizer)}")
        memorized.append(MemorizedImage(caption.strip(), image, metadata))
    return memorized


def read_table(path: str | Path) -> list[dict]:
    """The rows of a CSV (',' or ';' separated, with a header) or JSON file (a list of values or of objects);
    ValueError naming the file (and line) for one that is not readable as such."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no prompt list at {path}")
    if path.suffix == ".json":
        rows = _json(path, ValueError)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a JSON prompt list is a list of prompts or of objects")
        return [row if isinstance(row, dict) else dict(prompt=row) for row in rows]
    if path.suffix == ".csv":
        lines = _text(path).splitlines()
        if not lines:
            raise ValueError(f"{path}: the file is empty")
        delimiter = ";" if lines[0].count(";") > lines[0].count(",") else ","
        reader = csv.DictReader(lines, delimiter=delimiter)
        try:
            return [{key.strip(): value for key, value in row.items() if isinstance(key, str) and key}
                    for row in reader]
        except csv.Error as err:  # e.g. a field larger than csv's field size limit
            raise ValueError(f"{path} line {reader.line_num}: not a readable CSV row ({err})") from None
    raise ValueError(f"{path}: a prompt list is a .csv or .json file")


def row_prompt(row: dict) -> str | None:
    """A prompt list row's prompt (the first of `PROMPT_COLUMNS` it has)."""
    return next((row[name] for name in PROMPT_COLUMNS if name in row), None)


def read_prompt_list(path: str | Path) -> list[str]:
    """The prompts of a prompt list (`read_table`); ValueError naming the row of an empty one, or for no rows."""
    rows = read_table(path)
    prompts = []
    for number, row in enumerate(rows, start=1):
        prompt = row_prompt(row)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path} row {number}: no prompt (a column {' or '.join(PROMPT_COLUMNS)})")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"{path} row {number}: the prompt has {len(prompt)} characters; at most "
                             f"{MAX_PROMPT_CHARS} are accepted")
        prompts.append(prompt.strip())
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts
