"""The paper's story, clicked through in a real browser on the bundled model.

Replicate a memorized image, prune it away with NeMo, find it again with
Dori, look at the trigger map, export a ZIP. Each chapter is a test on one
shared page (module scope), in order, and screenshots its tab. Element ids are
listed at the top of each `dori_ui/*_tab.py`.
"""

from __future__ import annotations

import re
import zipfile
from typing import TYPE_CHECKING

import pytest

from analysis.triggers import METADATA_FILE, shipped_set_folder
from dori_ui.trigger_map_tab import BUILD

if TYPE_CHECKING:
    from playwright.sync_api import Page

# Without Playwright the suite is skipped (tests/browser/conftest.py explains when that is a failure instead).
expect = pytest.importorskip("playwright.sync_api").expect
PlaywrightTimeout = pytest.importorskip("playwright.sync_api").TimeoutError

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
    expect(page.locator("#replicate-plot .js-plotly-plot")).to_be_visible()  # Wen's signal, drawn per step
    screenshot(page, "replicate")


def test_nemo_makes_the_replicas_vanish(page: Page, screenshot):
    open_tab(page, "Mitigate")
    expect(page.locator("#mitigate-prompt input")).to_have_value(ASTRONAUT)
    page.locator("#mitigate-method").get_by_label("NeMo (neurons)").check()
    # NeMo's initial selection: on the bundled model refinement's smaller masks let replication back
    # (docs/results/mitigation.md, issue 3), so a teacher unticks it to show the image vanish.
    page.locator("#mitigate-refine input").uncheck()
    set_number(page, "mitigate-eval-seeds", SEEDS)
    page.locator("#mitigate-run").click()
    summary = page.locator("#mitigate-summary")
    expect(summary).to_contain_text("After:", timeout=600_000)
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


def test_trigger_map_select_a_point(page: Page, screenshot):
    open_tab(page, "Trigger map")
    expect(page.locator("#trigger-map-image input")).to_have_value(ASTRONAUT)
    if not (shipped_set_folder(0) / METADATA_FILE).is_file():
        # No shipped set in this checkout: build a small one here (resumed from runs/ on later runs).
        page.locator("#trigger-map-source").get_by_label(BUILD).check()
        set_number(page, "trigger-map-count", 4)
        set_number(page, "trigger-map-steps", 30)
    page.locator("#trigger-map-load").click()
    expect(page.locator("#trigger-map-status")).to_contain_text("triggers of", timeout=300_000)
    expect(page.locator("#trigger-map-plot .js-plotly-plot")).to_be_visible()
    for row, slot in ((1, "a"), (0, "b")):
        page.locator(f'#trigger-map-table [data-testid="cell-{row}-1"]').click()
        selected_summary = page.locator("#trigger-map-selected-summary")
        expect(selected_summary).to_contain_text(f"Trigger {row} replicates the training image in")
        expect(page.locator("#trigger-map-selected .caption-label").filter(has_text=VERDICT)).to_have_count(4)
        page.locator(f"#trigger-map-pin-{slot}").click()
        expect(page.locator(f"#trigger-map-pinned-{slot}")).to_contain_text(f"Trigger {row} replicates")
    # The map marks the selected trigger.
    expect(page.locator("#trigger-map-plot")).to_contain_text("selected: trigger 0")
    screenshot(page, "trigger_map")


def test_paths_of_the_triggers(page: Page, screenshot):
    open_tab(page, "Paths & masks")
    set_number(page, "paths-triggers", 4)
    page.locator("#paths-discrepancy-run").click()
    expect(page.locator("#paths-discrepancy-summary")).to_contain_text("4 triggers of")
    expect(page.locator("#paths-discrepancy-summary")).to_contain_text("triggers / prompts")
    expect(page.locator("#paths-discrepancy-plot")).to_contain_text("different memorized prompts")
    screenshot(page, "paths")


def test_export_the_search_as_a_zip(page: Page, tmp_path):
    open_tab(page, "Perturb")
    page.locator("#perturb-export").click()
    # The download button serves the ZIP once the export event has written it: try until it does.
    for _ in range(30):
        try:
            with page.expect_download(timeout=1000) as download:
                page.locator("#perturb-export-file").click()
            break
        except PlaywrightTimeout:
            continue
    path = tmp_path / "export.zip"
    download.value.save_as(path)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    assert "config.json" in names and "metrics.json" in names and "tensors.safetensors" in names
    assert any(name.startswith("images/") and name.endswith(".png") for name in names)


def test_attribution_highlights_words_and_compares_methods(page: Page, screenshot):
    open_tab(page, "Attribution")
    page.locator("#attribution-run").click()
    expect(page.locator("#attribution-summary")).not_to_be_empty()
    expect(page.locator("#attribution-words")).to_contain_text("astronaut")
    expect(page.locator("#attribution-plot .js-plotly-plot")).to_be_visible()
    page.locator("#attribution-method").get_by_label("Occlusion (remove each word)").check()
    page.locator("#attribution-run").click()
    # Both methods' bars, side by side: the legend names each.
    expect(page.locator("#attribution-plot")).to_contain_text("Occlusion (remove each word)")
    expect(page.locator("#attribution-plot")).to_contain_text("Gradient norm (Wen et al.)")
    screenshot(page, "attribution")


def test_inside_attention_timeline_and_detectors(page: Page, screenshot):
    open_tab(page, "Inside")
    expect(page.locator("#inside-image input")).to_have_value(ASTRONAUT)
    page.locator("#inside-attention-run").click()
    # The caption and a shipped trigger of the same image (and the caption under NeMo when the story set it).
    expect(page.locator("#inside-maps .caption-label").first).to_have_text("caption · portrait", timeout=120_000)
    expect(page.locator("#inside-maps .caption-label").filter(has_text="trigger (trigger 0)")).to_have_count(1)
    expect(page.locator("#inside-summary")).to_contain_text("most attended")
    page.locator("#inside-timeline-run").click()
    expect(page.locator("#inside-timeline-plot .js-plotly-plot")).to_be_visible(timeout=120_000)
    expect(page.locator("#inside-frames .caption-label").filter(has_text="held-out prompt")).to_have_count(1)
    page.locator("#inside-detect-run").click()
    expect(page.locator("#inside-detect-plot .js-plotly-plot")).to_be_visible(timeout=120_000)
    expect(page.locator("#inside-summary")).to_contain_text("reference prompts")
    page.locator("#inside-attention-run").click()
    expect(page.locator("#inside-summary")).to_contain_text("most attended", timeout=120_000)
    screenshot(page, "inside")


def test_finetune_and_switch_to_the_tuned_model(page: Page, screenshot):
    open_tab(page, "Fine-tune")
    for elem_id, value in (("finetune-rounds", 1), ("finetune-steps", 2), ("finetune-triggers", 1),
                           ("finetune-dori-steps", 5), ("finetune-dori-batch", 2), ("finetune-eval-seeds", 2)):
        set_number(page, elem_id, value)
    page.locator("#finetune-run").click()
    status = page.locator("#finetune-status")
    expect(status).to_contain_text("Fine-tuned 1 image(s) in 1 round(s)", timeout=600_000)
    expect(page.locator("#finetune-table")).to_contain_text("before")
    expect(page.locator("#finetune-side-effects")).to_contain_text("memorized, not selected")
    expect(page.locator("#finetune-side-effects")).to_contain_text("held-out prompt")
    expect(page.locator("#finetune-held-out")).to_contain_text("after ·")
    page.locator("#finetune-use").click()
    expect(status).to_contain_text("This session now uses the fine-tuned model")
    # The header names the tuned model for a person, not by its folder.
    expect(page.locator("#model-header")).to_contain_text(f"fine-tuned on: “{ASTRONAUT[:39]}…”, 1 round")
    screenshot(page, "finetune")
