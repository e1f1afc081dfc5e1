"""The paper's story, clicked through in a real browser on the bundled model.

Replicate a memorized image, prune it away with NeMo, find it again with
Dori, look at the trigger map, export a ZIP. Each chapter is a test on one
shared page (module scope), in order, and screenshots its tab. Element ids are
listed at the top of each `dori_ui/*_tab.py`.
"""

from __future__ import annotations

import re
import zipfile

from playwright.sync_api import Page, expect

# Small settings keep the whole story to a few minutes on 2 CPU cores.
SEEDS = 4
ASTRONAUT = "portrait of astronaut eileen collins beside the american flag"
# The paper's target for a mitigated prompt: at most 20% of seeds still replicate.
VANISHED_RATE = 0.2
# The image is back when the trigger replicates it in at least half the seeds.
RETURNED_RATE = 0.5

VERDICT = re.compile(r"^(not )?replicated · similarity")


def open_tab(page: Page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def set_number(page: Page, elem_id: str, value: int) -> None:
    page.locator(f"#{elem_id} input").fill(str(value))


def fraction(text: str, pattern: str) -> tuple[int, int]:
    """(k, n) from the first "k of n" that `pattern` (with two groups) finds in `text`."""
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in {text!r}"
    return int(match.group(1)), int(match.group(2))


def test_replicate_a_memorized_image(page: Page, screenshot):
    open_tab(page, "Replicate")
    page.locator("#replicate-training .thumbnail-item").first.click()
    expect(page.locator("#replicate-prompt textarea")).to_have_value(ASTRONAUT)
    set_number(page, "replicate-seeds", SEEDS)
    page.locator("#replicate-run").click()
    summary = page.locator("#replicate-summary")
    expect(summary).to_contain_text("seeds replicate")
    replicated, seeds = fraction(summary.inner_text(), r"(\d+) of (\d+) seeds replicate")
    assert seeds == SEEDS
    # The bundled model draws this photo for every seed (docs/results/memorization.md).
    assert replicated == SEEDS
    expect(page.locator("#replicate-gallery .caption-label").filter(has_text=VERDICT)).to_have_count(SEEDS)
    screenshot(page, "replicate")


def test_nemo_makes_the_replicas_vanish(page: Page, screenshot):
    open_tab(page, "Mitigate")
    expect(page.locator("#mitigate-prompt input")).to_have_value(ASTRONAUT)
    page.locator("#mitigate-method").get_by_label("NeMo (neurons)").check()
    set_number(page, "mitigate-eval-seeds", SEEDS)
    page.locator("#mitigate-run").click()
    summary = page.locator("#mitigate-summary")
    expect(summary).to_contain_text("After:", timeout=300_000)
    text = summary.inner_text()
    before, seeds = fraction(text, r"Before: (\d+) of (\d+) seeds replicate")
    after, _ = fraction(text, r"After: (\d+) of (\d+) seeds replicate")
    screenshot(page, "mitigate")
    # The session now generates with the mask: the header says so.
    expect(page.locator("#model-header")).to_contain_text("mitigation: nemo")
    assert before == seeds
    assert after / seeds <= VANISHED_RATE, f"NeMo left {after} of {seeds} seeds replicating: {text}"


def test_dori_brings_the_image_back(page: Page, screenshot):
    open_tab(page, "Perturb")
    expect(page.locator("#perturb-target input")).to_have_value(ASTRONAUT)
    # The paper's attack on a mitigated prompt: a small move away from its own embedding.
    page.locator("#perturb-start").get_by_label("the prompt's own embedding").check()
    set_number(page, "perturb-eval-seeds", SEEDS)
    set_number(page, "perturb-preview-every", 0)
    page.locator("#perturb-run").click()
    status = page.locator("#perturb-status")
    expect(status).to_contain_text("the trigger replicates", timeout=300_000)
    text = status.inner_text()
    assert "against the mitigated model" in text
    returned, seeds = fraction(text, r"in (\d+) of (\d+) seeds")
    assert seeds == SEEDS
    expect(page.locator("#perturb-after .caption-label").filter(has_text=VERDICT)).to_have_count(SEEDS)
    screenshot(page, "perturb")
    assert returned / seeds >= RETURNED_RATE, f"the trigger replicates in only {returned} of {seeds} seeds: {text}"


def test_export_the_search_as_a_zip(page: Page, tmp_path):
    open_tab(page, "Perturb")
    page.locator("#perturb-export").click()
    link = page.locator("#perturb-export-file a").first
    expect(link).to_be_visible()
    with page.expect_download() as download:
        link.click()
    path = tmp_path / "export.zip"
    download.value.save_as(path)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    assert "config.json" in names and "metrics.json" in names and "tensors.safetensors" in names
    assert any(name.startswith("images/") and name.endswith(".png") for name in names)


def test_attribution_tab_shows(page: Page, screenshot):
    open_tab(page, "Attribution")
    screenshot(page, "attribution")
