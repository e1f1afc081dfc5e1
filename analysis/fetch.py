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

A list is not trusted: an image's file name is its row's `Index` made safe (`file_key`), always inside the folder,
and two rows with the same key are refused before anything is fetched. Besides the per-read `timeout`, each image
has an overall `deadline` (a server that drips bytes cannot hold a row forever). Redirects are followed only to
http(s), at most `MAX_REDIRECTS` times, and never to a loopback or private address unless the list's URL was one;
a redirect to another host is recorded in the row's `redirected_to` column.
"""

from __future__ import annotations

import csv
import http.client
import io
import ipaddress
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image, UnidentifiedImageError

from analysis.limits import MAX_REDIRECTS
from analysis.memorized import read_table, row_prompt

METADATA_FILE = "metadata.csv"
DEAD_LINKS_FILE = "dead_links.csv"
METADATA_COLUMNS = ["file_name", "text", "url", "type", "index", "redirected_to"]
DEFAULT_TIMEOUT_S = 20.0
DEFAULT_DEADLINE_S = 120.0
DEFAULT_RETRIES = 2
DEFAULT_MAX_BYTES = 20 * 2**20
RETRY_PAUSE_S = 1.0  # doubled after every failed try
CHUNK = 1 << 16
USER_AGENT = "dori-lab-fetch/0.1 (research; memorized LAION images)"
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
MAX_KEY_CHARS = 100


class FetchFailed(Exception):
    """One image could not be fetched; the message is the reason listed in the dead-link report. `retry`: whether
    another try may succeed (a timeout, a connection or server error; not a 4xx answer or a body too large)."""

    def __init__(self, reason: str, retry: bool = False):
        super().__init__(reason)
        self.retry = retry


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
    redirected: list[dict] = field(default_factory=list)  # {"index", "url", "redirected_to"}: to another host

    def as_dict(self) -> dict:
        return dict(folder=str(self.folder), fetched=len(self.fetched), already_there=self.skipped,
                    dead=len(self.dead), dead_links=str(self.folder / DEAD_LINKS_FILE),
                    redirected_to_other_hosts=len(self.redirected))


def file_key(index: str) -> str:
    """A row's `Index` as a file name's stem: runs of anything but letters, digits, '_' and '-' become one '_'
    (so '../x/pwned' is 'x_pwned'), at most MAX_KEY_CHARS characters; ValueError when nothing is left."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", index).strip("_")[:MAX_KEY_CHARS]
    if not key:
        raise ValueError(f"the Index {index!r} has no letter or digit to name its file by")
    return key


def _rows(prompts: str | Path, verbatim_only: bool) -> list[dict]:
    """The list's rows with a URL, as {"index", "key", "caption", "url", "type"}, verbatim ones first; ValueError
    when two rows would be saved under one file name."""
    rows, seen = [], {}
    for number, row in enumerate(read_table(prompts), start=1):
        url, caption = (row.get("URL") or row.get("url") or "").strip(), row_prompt(row)
        if not url or not caption:
            continue
        index = str(row.get("Index") or row.get("") or number - 1)
        try:
            key = file_key(index)
        except ValueError as err:
            raise ValueError(f"{prompts} row {number}: {err}") from None
        if key in seen:
            raise ValueError(f"{prompts} rows {seen[key]} and {number} would both be saved as {key!r} (Index "
                             f"{index!r}); give every row its own Index")
        seen[key] = number
        rows.append(dict(index=index, key=key, caption=caption.strip(), url=url,
                         type=(row.get("type") or "").strip()))
    if verbatim_only:
        rows = [row for row in rows if row["type"] == "VM"]
    return sorted(rows, key=lambda row: row["type"] != "VM")  # stable: the list's order within each type


def _is_internal(host: str | None) -> bool:
    """Whether `host` is, or resolves to, a loopback, private, link-local or otherwise non-public address."""
    if not host:
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False  # unresolvable: the request itself will fail
    return any(not ipaddress.ip_address(address.split("%")[0]).is_global for address in addresses)


def redirect_refusal(original: str, target: str) -> str | None:
    """Why a redirect from `original` to `target` is not followed, or None when it may be."""
    scheme = urlsplit(target).scheme.lower()
    if scheme not in ("http", "https"):
        return f"redirected to a {scheme or 'relative'} URL, not http(s): {target[:200]}"
    if _is_internal(urlsplit(target).hostname) and not _is_internal(urlsplit(original).hostname):
        return f"redirected to a loopback or private address: {target[:200]}"
    return None


class _Redirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, at most MAX_REDIRECTS of them and only where `redirect_refusal` allows."""

    max_redirections = MAX_REDIRECTS

    def redirect_request(self, request, answer, code, message, headers, new_url):
        refusal = redirect_refusal(request.get_full_url(), new_url)
        if refusal is not None:
            raise FetchFailed(refusal)
        return super().redirect_request(request, answer, code, message, headers, new_url)


class _Deadline:
    """Closes every connection of one download when its deadline passes, whatever phase it is in (connecting,
    headers, body): a server that sends a byte just within each read's timeout would otherwise hold it forever."""

    def __init__(self, seconds: float):
        self.sockets: list[socket.socket] = []
        self.passed = False
        self.timer = threading.Timer(max(seconds, 0.0), self._close)
        self.timer.daemon = True

    def _close(self) -> None:
        self.passed = True
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed

    def handlers(self) -> list[urllib.request.BaseHandler]:
        deadline = self

        def connection(base: type) -> type:
            class Connection(base):
                def connect(self):
                    super().connect()
                    deadline.sockets.append(self.sock)
                    if deadline.passed:
                        deadline._close()
            return Connection

        class HTTP(urllib.request.HTTPHandler):
            def http_open(self, request):
                return self.do_open(connection(http.client.HTTPConnection), request)

        class HTTPS(urllib.request.HTTPSHandler):
            def https_open(self, request):
                return self.do_open(connection(http.client.HTTPSConnection), request, context=self._context)

        return [HTTP(), HTTPS(), _Redirects()]


def download(url: str, timeout: float, max_bytes: int, deadline: float = DEFAULT_DEADLINE_S) -> tuple[bytes, str]:
    """The body at `url` (http or https only) and the URL it came from after redirects; FetchFailed with the reason
    for an error answer, a body over `max_bytes`, a refused redirect, `deadline` seconds passing, or anything urllib
    raises (timeouts included)."""
    if not url.lower().startswith(("http://", "https://")):
        raise FetchFailed(f"not an http(s) URL: {url}")
    watch = _Deadline(deadline)
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    watch.timer.start()
    try:
        with urllib.request.build_opener(*watch.handlers()).open(request, timeout=timeout) as answer:
            length = answer.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise FetchFailed(f"too large: {int(length)} bytes (limit {max_bytes})")
            body = bytearray()
            while chunk := answer.read1(CHUNK):  # read1: one read at a time, so the deadline is checked between
                body += chunk
                if len(body) > max_bytes:
                    raise FetchFailed(f"too large: over {max_bytes} bytes")
                if watch.passed:
                    break
            if watch.passed:
                raise FetchFailed(f"deadline: the download took more than {deadline:g} s")
            return bytes(body), answer.geturl()
    except urllib.error.HTTPError as err:
        raise FetchFailed(f"HTTP {err.code} {err.reason}", retry=err.code >= 500) from err
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as err:
        if watch.passed:
            raise FetchFailed(f"deadline: the download took more than {deadline:g} s") from err
        reason = getattr(err, "reason", err)
        raise FetchFailed(f"{type(err).__name__}: {reason}", retry=True) from err
    finally:
        watch.timer.cancel()


def _retrying(url: str, timeout: float, max_bytes: int, retries: int, pause: float,
              deadline: float) -> tuple[bytes, str]:
    """`download`, tried again up to `retries` times after a timeout, a connection error or a 5xx answer, all tries
    within `deadline` seconds."""
    end = time.monotonic() + deadline
    attempt = 0
    while True:
        try:
            return download(url, timeout, max_bytes, deadline=end - time.monotonic())
        except FetchFailed as failure:
            if time.monotonic() >= end:
                raise FetchFailed(f"deadline: the image took more than {deadline:g} s") from failure
            wait = pause * 2**attempt
            if not failure.retry or attempt == retries or time.monotonic() + wait >= end:
                raise
            time.sleep(wait)
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


def _cross_host(url: str, final: str) -> str:
    """`final` when it lies on another host than `url`, else ""."""
    return final if urlsplit(final).hostname != urlsplit(url).hostname else ""


def fetch_memorized(prompts: str | Path, folder: str | Path, verbatim_only: bool = False, limit: int | None = None,
                    timeout: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
                    max_bytes: int = DEFAULT_MAX_BYTES, retry_pause: float = RETRY_PAUSE_S,
                    deadline: float = DEFAULT_DEADLINE_S,
                    callback: Callable[[FetchProgress], None] | None = None) -> FetchReport:
    """Fetch the images of the list `prompts` into the imagefolder set `folder`, resuming what is there.

    `limit`: at most this many rows of the (ordered) list. `timeout`: seconds per read; `deadline`: seconds per
    image, all tries together. `callback` runs after every row; an exception it raises (e.g. KeyboardInterrupt)
    stops the fetch with every finished image kept. ValueError, before anything is fetched, for a list whose rows
    would share a file name.
    """
    rows = _rows(prompts, verbatim_only)[:limit]
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    metadata_path = folder / METADATA_FILE
    listed = read_table(metadata_path) if metadata_path.is_file() else []
    done_urls = {row["url"] for row in listed if (folder / row["file_name"]).is_file()}
    todo = [row for row in rows if row["url"] not in done_urls]
    report = FetchReport(folder, skipped=len(rows) - len(todo))
    for number, row in enumerate(todo, start=1):
        failure = None
        try:
            body, final = _retrying(row["url"], timeout, max_bytes, retries, retry_pause, deadline)
            name = f"{row['key']}{EXTENSIONS.get(_image_format(body), '.img')}"
            _write_atomically(folder / name, body)
            listed = [item for item in listed if item["file_name"] != name]
            listed.append(dict(file_name=name, text=row["caption"], url=row["url"], type=row["type"],
                               index=row["index"], redirected_to=_cross_host(row["url"], final)))
            _write_csv(metadata_path, METADATA_COLUMNS, listed)
            report.fetched.append(row["url"])
            if listed[-1]["redirected_to"]:
                report.redirected.append(dict(index=row["index"], url=row["url"], redirected_to=final))
        except FetchFailed as err:
            failure = str(err)
            report.dead.append(dict(index=row["index"], url=row["url"], caption=row["caption"], reason=failure))
        finally:
            _write_csv(folder / DEAD_LINKS_FILE, ["index", "url", "caption", "reason"], report.dead)
        if callback is not None:
            callback(FetchProgress(number, len(todo), row["url"], failure))
    return report
