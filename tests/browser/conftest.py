"""Browser fixtures: the app on the bundled model in a subprocess, driven by Playwright with Debian's chromium.

No browser is downloaded: Playwright launches the system chromium (`.ci/run`
installs it with apt). Without it the suite is skipped, unless
DORI_REQUIRE_BROWSER=1 (set by `.ci/run`) makes that a failure.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from analysis.bench import app_process

CHROMIUM = Path(os.environ.get("DORI_CHROMIUM", "/usr/bin/chromium"))
REPOSITORY = Path(__file__).resolve().parents[2]
# The README's screenshots. The suite writes its screenshots to a temporary folder; only
# `DORI_SCREENSHOTS=docs/screenshots python -m pytest -q tests/browser` writes them here.
SCREENSHOTS = REPOSITORY / "docs" / "screenshots"
SCREENSHOTS_VARIABLE = "DORI_SCREENSHOTS"


def _missing_browser_reason() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install -e '.[test]')"
    if not CHROMIUM.is_file():
        return f"no chromium at {CHROMIUM} (apt-get install chromium, or set DORI_CHROMIUM)"
    return None


@pytest.fixture(scope="session")
def app_url(tmp_path_factory):
    """URL of `python app.py` on the bundled model, started once for the whole browser suite."""
    reason = _missing_browser_reason()
    if reason is not None:
        if os.environ.get("DORI_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser suite required but {reason}")
        pytest.skip(reason)
    log = tmp_path_factory.mktemp("app") / "app.log"
    with log.open("w") as output:
        try:
            with app_process(output) as url:
                yield url
        except RuntimeError as err:
            raise RuntimeError(f"{err}; its log:\n{log.read_text()[-3000:]}") from err


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import expect, sync_playwright

    # Model runs take seconds to minutes on a shared 2-core machine; Playwright's default wait is 5 s.
    expect.set_options(timeout=120_000)
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where chromium refuses its sandbox.
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(browser, app_url):
    """One page for a whole story module: its chapters build on each other's state, as a user's session does."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(120_000)
    page.goto(app_url)
    page.get_by_role("tab", name="Replicate").wait_for()
    yield page
    context.close()


def screenshot_folder(environ: dict, temporary: Path) -> Path:
    """Where the suite's screenshots go: `temporary`, or the folder that $DORI_SCREENSHOTS names (relative to the
    repository), so that running the tests never rewrites the README's screenshots."""
    chosen = environ.get(SCREENSHOTS_VARIABLE)
    return REPOSITORY / chosen if chosen else temporary


def screenshot_saver(folder: Path):
    """`save(page, name)`: the whole page to `folder/<name>.png`."""
    folder.mkdir(parents=True, exist_ok=True)

    def save(page, name: str) -> Path:
        path = folder / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return save


@pytest.fixture(scope="session")
def screenshot(tmp_path_factory):
    """`screenshot(page, name)` saves the whole page to `screenshot_folder`."""
    return screenshot_saver(screenshot_folder(os.environ, tmp_path_factory.mktemp("screenshots")))
