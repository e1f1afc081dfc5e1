"""`dori memorized fetch` against a local HTTP server on 127.0.0.1: a good image, a dead link, a non-image, a too
large image and a slow answer; resuming after an interruption; a server that drips bytes, redirects, and lists whose
Index would write outside the folder or twice to one file."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

from analysis.cli import main
from analysis.fetch import DEAD_LINKS_FILE, fetch_memorized, file_key, redirect_refusal
from analysis.memorized import load_memorized_set
from analysis.model import load_model

TIMEOUT_S = 0.5
SLOW_S = 2.0  # longer than every try of the slow answer
MAX_BYTES = 4000
DRIP_PAUSE_S = 0.1  # between the bytes of the dripping answer: each read gets a byte well within TIMEOUT_S
DRIP_BYTES = 200  # the dripping answer would take DRIP_BYTES * DRIP_PAUSE_S, over twice DEADLINE_S
DEADLINE_S = 1.0


def png(size: int, colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD = png(24, (200, 30, 30))
OTHER_GOOD = png(20, (30, 30, 200))
BIG = bytes(range(256)) * 40  # 10 240 bytes, over MAX_BYTES


class Handler(BaseHTTPRequestHandler):
    requests: Counter = Counter()

    def do_GET(self):  # noqa: N802 - http.server's name
        Handler.requests[self.path] += 1
        port = self.server.server_address[1]
        redirects = {"/to-ftp.png": "ftp://127.0.0.1/good.png", "/loop.png": "/loop.png",
                     "/to-localhost.png": f"http://localhost:{port}/good.png", "/to-good.png": "/good.png"}
        if self.path in redirects:
            self.send_response(302)
            self.send_header("Location", redirects[self.path])
            self.end_headers()
            return
        if self.path == "/drip.png":
            self.drip()
            return
        if self.path == "/slow.png":
            time.sleep(SLOW_S)
        bodies = {"/good.png": GOOD, "/other.png": OTHER_GOOD, "/text.png": b"<html>not an image</html>",
                  "/big.png": BIG, "/slow.png": GOOD}
        if self.path not in bodies:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(bodies[self.path])))
        self.end_headers()
        try:
            self.wfile.write(bodies[self.path])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting (the slow answer)

    def drip(self):
        """A byte at a time, each within the read timeout, until the client hangs up."""
        self.send_response(200)
        self.send_header("Content-Length", str(DRIP_BYTES))
        self.end_headers()
        try:
            for _ in range(DRIP_BYTES):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(DRIP_PAUSE_S)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def prompt_list(server, tmp_path):
    """A list of the shipped list's shape (`;`-separated; Caption, URL, type, Index); the verbatim rows last."""
    rows = [("a red circle on a white background", "/dead.png", "TM", "11"),
            ("a large red ring on a blue background", "/text.png", "TM", "12"),
            ("a small blue square on a white background", "/big.png", "TM", "13"),
            ("a green ring on a black background", "/slow.png", "TM", "14"),
            ("a photo of the red lighthouse", "/good.png", "VM", "15"),
            ("the golden retriever on the beach", "/other.png", "VM", "16")]
    path = tmp_path / "prompts.csv"
    with open(path, "w", newline="") as file:
        writer = csv.writer(file, delimiter=";")
        writer.writerow(["", "Caption", "URL", "type", "mean_sscd", "max_sscd", "Index"])
        writer.writerows([number, caption, server + url, kind, "0.5", "0.6", index]
                         for number, (caption, url, kind, index) in enumerate(rows))
    return path


def fetch(prompt_list, folder, *options):
    return main(["memorized", "fetch", "--prompts", str(prompt_list), "--folder", str(folder),
                 "--timeout", str(TIMEOUT_S), "--retries", "1", "--max-mb", str(MAX_BYTES / 2**20), "--json",
                 "--quiet", *options])


def test_fetch_keeps_good_images_and_reports_dead_links(prompt_list, tmp_path, capsys, tiny_sd_folder):
    Handler.requests.clear()
    assert fetch(prompt_list, tmp_path / "set") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fetched"] == 2 and report["dead"] == 4 and report["already_there"] == 0
    with open(tmp_path / "set" / DEAD_LINKS_FILE) as file:
        dead = {row["url"].rsplit("/", 1)[1]: row["reason"] for row in csv.DictReader(file)}
    assert dead["dead.png"] == "HTTP 404 Not Found"
    assert dead["text.png"].startswith("not a decodable image")
    assert dead["big.png"].startswith("too large: 10240 bytes")
    assert "timed out" in dead["slow.png"]
    # Retried: the timeout, once; not the 404, the non-image or the too large one.
    assert Handler.requests["/slow.png"] == 2 and Handler.requests["/dead.png"] == 1
    # Verbatim rows first, and the folder is a memorized set that loads.
    with open(tmp_path / "set" / "metadata.csv") as file:
        listed = list(csv.DictReader(file))
    assert [row["file_name"] for row in listed] == ["15.png", "16.png"] and listed[0]["type"] == "VM"
    handle = load_model(tiny_sd_folder, memorized=tmp_path / "set")
    assert [m.caption for m in handle.memorized] == ["a photo of the red lighthouse", "the golden retriever on the beach"]
    assert handle.memorized[0].image[0].mean() > 0.5 > handle.memorized[0].image[2].mean()  # red


def test_verbatim_only_and_limit(prompt_list, tmp_path, capsys):
    assert fetch(prompt_list, tmp_path / "set", "--verbatim-only", "--limit", "1") == 0
    assert json.loads(capsys.readouterr().out)["fetched"] == 1
    assert sorted(path.name for path in (tmp_path / "set").iterdir()) == ["15.png", DEAD_LINKS_FILE, "metadata.csv"]


def test_an_interrupted_fetch_resumes_without_downloading_again(prompt_list, tmp_path, tiny_sd_folder):
    Handler.requests.clear()
    folder = tmp_path / "set"

    def interrupt(event):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fetch_memorized(prompt_list, folder, verbatim_only=True, timeout=TIMEOUT_S, callback=interrupt)
    assert [path.name for path in folder.iterdir() if path.suffix == ".png"] == ["15.png"]
    report = fetch_memorized(prompt_list, folder, verbatim_only=True, timeout=TIMEOUT_S)
    assert report.skipped == 1 and len(report.fetched) == 1 and not report.dead
    assert Handler.requests["/good.png"] == 1 and Handler.requests["/other.png"] == 1
    # No temporary file is left, and the set is whole.
    assert not [path for path in folder.iterdir() if path.name.endswith(".partial")]
    handle = load_model(tiny_sd_folder)
    images = load_memorized_set(folder, handle.tokenizer, handle.image_size)
    assert len(images) == 2 and torch.all(images[1].image[2] > 0)  # the blue one


def write_list(path, server, rows):
    """A list of the shipped list's shape from (caption, url path, type, Index) rows."""
    with open(path, "w", newline="") as file:
        writer = csv.writer(file, delimiter=";")
        writer.writerow(["", "Caption", "URL", "type", "Index"])
        writer.writerows([number, caption, server + url, kind, index]
                         for number, (caption, url, kind, index) in enumerate(rows))
    return path


def dead_reasons(folder):
    with open(folder / DEAD_LINKS_FILE) as file:
        return {row["url"].rsplit("/", 1)[1]: row["reason"] for row in csv.DictReader(file)}


def test_file_names_stay_inside_the_folder(server, tmp_path, capsys):
    rows = [("a photo of the red lighthouse", "/good.png", "VM", "../escaped/pwned"),
            ("the golden retriever on the beach", "/other.png", "VM", str(tmp_path / "absolute"))]
    prompts = write_list(tmp_path / "prompts.csv", server, rows)
    assert fetch(prompts, tmp_path / "set") == 0
    assert json.loads(capsys.readouterr().out)["fetched"] == 2
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "absolute.png").exists()
    inside = sorted(path.name for path in (tmp_path / "set").iterdir() if path.suffix == ".png")
    assert inside == ["escaped_pwned.png", f"{file_key(str(tmp_path))}_absolute.png"]
    with open(tmp_path / "set" / "metadata.csv") as file:
        assert [row["index"] for row in csv.DictReader(file)] == ["../escaped/pwned", str(tmp_path / "absolute")]


@pytest.mark.parametrize("indices", [("7", "7"), ("a/b", "a_b")])
def test_rows_that_share_a_file_name_are_refused_before_fetching(server, tmp_path, capsys, indices):
    Handler.requests.clear()
    rows = [("a photo of the red lighthouse", "/good.png", "VM", indices[0]),
            ("a green ring on a black background", "/dead.png", "TM", "8"),
            ("the golden retriever on the beach", "/other.png", "VM", indices[1])]
    prompts = write_list(tmp_path / "prompts.csv", server, rows)
    assert fetch(prompts, tmp_path / "set") == 2
    err = capsys.readouterr().err
    assert "rows 1 and 3 would both be saved as" in err and len(err.splitlines()) == 1
    assert not Handler.requests and not any((tmp_path / "set").iterdir())


def test_a_dripping_server_is_stopped_by_the_deadline_and_listed_dead(server, tmp_path, capsys):
    rows = [("a photo of the red lighthouse", "/drip.png", "VM", "1"),
            ("the golden retriever on the beach", "/good.png", "VM", "2")]
    prompts = write_list(tmp_path / "prompts.csv", server, rows)
    assert fetch(prompts, tmp_path / "set", "--deadline", str(DEADLINE_S)) == 0
    assert json.loads(capsys.readouterr().out)["fetched"] == 1
    assert dead_reasons(tmp_path / "set") == {"drip.png": f"deadline: the image took more than {DEADLINE_S:g} s"}


def test_redirects_are_followed_only_to_http_and_recorded_across_hosts(server, tmp_path, capsys):
    rows = [("a photo of the red lighthouse", "/to-ftp.png", "VM", "1"),
            ("a green ring on a black background", "/loop.png", "VM", "2"),
            ("the golden retriever on the beach", "/to-localhost.png", "VM", "3"),
            ("a small blue square on a white background", "/to-good.png", "VM", "4")]
    prompts = write_list(tmp_path / "prompts.csv", server, rows)
    assert fetch(prompts, tmp_path / "set") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fetched"] == 2 and report["redirected_to_other_hosts"] == 1
    dead = dead_reasons(tmp_path / "set")
    assert dead["to-ftp.png"].startswith("redirected to a ftp URL, not http(s)")
    assert "redirect" in dead["loop.png"] and Handler.requests["/loop.png"] <= 6
    with open(tmp_path / "set" / "metadata.csv") as file:
        redirected = {row["index"]: row["redirected_to"] for row in csv.DictReader(file)}
    assert redirected == {"3": server.replace("127.0.0.1", "localhost") + "/good.png", "4": ""}


def test_a_public_url_is_not_redirected_to_a_private_or_loopback_address():
    public = "http://93.184.216.34/image.png"
    for internal in ("http://127.0.0.1/x.png", "http://10.1.2.3/x.png", "http://169.254.169.254/latest",
                     "http://[::1]/x.png", "http://192.168.0.1/x.png"):
        assert "loopback or private" in redirect_refusal(public, internal)
    assert redirect_refusal(public, "https://8.8.8.8/x.png") is None
    assert redirect_refusal("http://127.0.0.1:8000/a.png", "http://127.0.0.1:9000/b.png") is None
    assert "not http(s)" in redirect_refusal(public, "file:///etc/passwd")


@pytest.mark.parametrize("option, value", [("--limit", "0"), ("--max-mb", "inf"), ("--max-mb", "0"),
                                           ("--timeout", "inf"), ("--timeout", "1e300"), ("--timeout", "nan"),
                                           ("--deadline", "0"), ("--retries", "-1"), ("--retries", "1000")])
def test_bad_fetch_options_exit_2_with_one_line(prompt_list, tmp_path, capsys, option, value):
    Handler.requests.clear()
    assert fetch(prompt_list, tmp_path / "set", option, value) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dori memorized fetch: error: argument {option}:") and len(err.splitlines()) == 1
    assert not Handler.requests
