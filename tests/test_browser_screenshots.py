"""The browser suite's screenshots: a test run leaves the README's screenshots alone."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BROWSER_CONFTEST = Path(__file__).parent / "browser" / "conftest.py"


def browser_fixtures():
    spec = importlib.util.spec_from_file_location("browser_conftest", BROWSER_CONFTEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakePage:
    def screenshot(self, path: str, full_page: bool) -> None:
        Path(path).write_bytes(b"png")


def test_the_suite_writes_screenshots_to_a_temporary_folder_unless_told(tmp_path):
    fixtures = browser_fixtures()
    docs = fixtures.SCREENSHOTS
    before = {path.name: path.stat().st_mtime_ns for path in docs.glob("*.png")}
    folder = fixtures.screenshot_folder({}, tmp_path / "shots")
    saved = fixtures.screenshot_saver(folder)(FakePage(), "replicate")
    assert saved == tmp_path / "shots" / "replicate.png" and saved.read_bytes() == b"png"
    assert {path.name: path.stat().st_mtime_ns for path in docs.glob("*.png")} == before
    # Refreshing the README's screenshots is asked for by name.
    assert fixtures.screenshot_folder({"DORI_SCREENSHOTS": "docs/screenshots"}, tmp_path) == docs
