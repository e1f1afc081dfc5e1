"""Download the images of a memorized-prompt list into an imagefolder memorized set (`dori memorized fetch`).

    report = fetch_memorized(SD14_MEMORIZED_FILE, "data/sd14-memorized", verbatim_only=True)
    handle = load_model("path/to/sd-v1-4", memorized="data/sd14-memorized")

The list is a CSV of the shape of `assets/sd14_memorization/memorized_laion_prompts.csv` (`;`-separated, columns
`Caption`, `URL`, `type` VM/TM, optionally `Index`); rows without a URL are skipped. Verbatim (`VM`) rows are
fetched first. Each image is downloaded with a timeout, retried after connection errors, timeouts and server
errors (not after 4xx answers), refused above a size limit, and kept only when it decodes as an image. It is
written under a temporary name and renamed into place before its row is added to `metadata.csv` (also replaced
atomically), so an interrupted fetch never leaves a partial image in the set, and a second run skips every image
already listed. Links that failed are listed with the reason in `dead_links.csv` (rewritten by every run). Nothing
here runs at import: only `fetch_memorized` downloads.
"""

from __future__ import annotations

import csv
import io
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from analysis.memorized import read_table, row_prompt

METADATA_FILE = "metadata.csv"
DEAD_LINKS_FILE = "dead_links.csv"
METADATA_COLUMNS = ["file_name", "text", "url", "type", "index"]
DEFAULT_TIMEOUT_S = 20.0
DEFAULT_RETRIES = 2
DEFAULT_MAX_BYTES = 20 * 2**20
RETRY_PAUSE_S = 1.0  # doubled after every failed try
CHUNK = 1 << 16
USER_AGENT = "dori-lab-fetch/0.1 (research; memorized LAION images)"
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


class FetchFailed(Exception):
    """One image could not be fetched; the message is the reason listed in the dead-link report."""


@dataclass
class FetchProgress:
    """What a `fetch_memorized` callback receives after each row."""

    done: int  # rows handled so far in this run
    total: int  # rows to handle in this run (already fetched ones excluded)
    url: str
    failure: str | None  # None: the image is in the set


@dataclass
class FetchReport:
    folder: Path
    fetched: list[str] = field(default_factory=list)  # URLs downloaded in this run
    skipped: int = 0  # rows already in the set
    dead: list[dict] = field(default_factory=list)  # {"index", "url", "caption", "reason"}

    def as_dict(self) -> dict:
        return dict(folder=str(self.folder), fetched=len(self.fetched), already_there=self.skipped,
                    dead=len(self.dead), dead_links=str(self.folder / DEAD_LINKS_FILE))


def _rows(prompts: str | Path, verbatim_only: bool) -> list[dict]:
    """The list's rows with a URL, as {"index", "caption", "url", "type"}, verbatim ones first."""
    rows = []
    for number, row in enumerate(read_table(prompts)):
        url, caption = (row.get("URL") or row.get("url") or "").strip(), row_prompt(row)
        if not url or not caption:
            continue
        rows.append(dict(index=str(row.get("Index") or row.get("") or number), caption=caption.strip(), url=url,
                         type=(row.get("type") or "").strip()))
    if verbatim_only:
        rows = [row for row in rows if row["type"] == "VM"]
    return sorted(rows, key=lambda row: row["type"] != "VM")  # stable: the list's order within each type


def download(url: str, timeout: float, max_bytes: int) -> bytes:
    """The body at `url` (http or https only); FetchFailed with the reason for an error answer, a body over
    `max_bytes`, or anything urllib raises (timeouts included)."""
    if not url.lower().startswith(("http://", "https://")):
        raise FetchFailed(f"not an http(s) URL: {url}")
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            length = answer.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise FetchFailed(f"too large: {int(length)} bytes (limit {max_bytes})")
            body = bytearray()
            while chunk := answer.read(CHUNK):
                body += chunk
                if len(body) > max_bytes:
                    raise FetchFailed(f"too large: over {max_bytes} bytes")
            return bytes(body)
    except urllib.error.HTTPError as err:
        raise FetchFailed(f"HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise FetchFailed(f"{type(err).__name__}: {reason}") from err


def _retrying(url: str, timeout: float, max_bytes: int, retries: int, pause: float) -> bytes:
    """`download`, tried again up to `retries` times after a timeout, a connection error or a 5xx answer."""
    attempt = 0
    while True:
        try:
            return download(url, timeout, max_bytes)
        except FetchFailed as failure:
            cause = failure.__cause__
            # An answer of the server about the request (4xx) or a body too large does not change on a retry.
            final = (isinstance(cause, urllib.error.HTTPError) and cause.code < 500) or cause is None
            if final or attempt == retries:
                raise
            time.sleep(pause * 2**attempt)
            attempt += 1


def _image_format(body: bytes) -> str:
    """The decoded image's format; FetchFailed when the body is not an image PIL decodes."""
    try:
        with Image.open(io.BytesIO(body)) as picture:
            picture.load()
            return picture.format or "PNG"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise FetchFailed(f"not a decodable image: {err}") from err


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    _write_atomically(path, text.getvalue().encode("utf-8"))


def fetch_memorized(prompts: str | Path, folder: str | Path, verbatim_only: bool = False, limit: int | None = None,
                    timeout: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
                    max_bytes: int = DEFAULT_MAX_BYTES, retry_pause: float = RETRY_PAUSE_S,
                    callback: Callable[[FetchProgress], None] | None = None) -> FetchReport:
    """Fetch the images of the list `prompts` into the imagefolder set `folder`, resuming what is there.

    `limit`: at most this many rows of the (ordered) list. `callback` runs after every row; an exception it raises
    (e.g. KeyboardInterrupt) stops the fetch with every finished image kept.
    """
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    metadata_path = folder / METADATA_FILE
    listed = read_table(metadata_path) if metadata_path.is_file() else []
    done_urls = {row["url"] for row in listed if (folder / row["file_name"]).is_file()}
    rows = _rows(prompts, verbatim_only)[:limit]
    todo = [row for row in rows if row["url"] not in done_urls]
    report = FetchReport(folder, skipped=len(rows) - len(todo))
    for number, row in enumerate(todo, start=1):
        failure = None
        try:
            body = _retrying(row["url"], timeout, max_bytes, retries, retry_pause)
            name = f"{row['index']}{EXTENSIONS.get(_image_format(body), '.img')}"
            _write_atomically(folder / name, body)
            listed = [item for item in listed if item["file_name"] != name]
            listed.append(dict(file_name=name, text=row["caption"], url=row["url"], type=row["type"],
                               index=row["index"]))
            _write_csv(metadata_path, METADATA_COLUMNS, listed)
            report.fetched.append(row["url"])
        except FetchFailed as err:
            failure = str(err)
            report.dead.append(dict(index=row["index"], url=row["url"], caption=row["caption"], reason=failure))
        finally:
            _write_csv(folder / DEAD_LINKS_FILE, ["index", "url", "caption", "reason"], report.dead)
        if callback is not None:
            callback(FetchProgress(number, len(todo), row["url"], failure))
    return report
