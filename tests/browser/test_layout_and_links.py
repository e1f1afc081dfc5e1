"""Layout and linked views in a real browser on the bundled model: empty boxes collapse, gallery captions are
whole, a trigger clicked on the map is the selected trigger everywhere it is used. No screenshots (the story's
`test_story.py` takes those)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Page

expect = pytest.importorskip("playwright.sync_api").expect


def test_empty_boxes_take_one_line_until_they_hold_something(page: Page):
    page.get_by_role("tab", name="Perturb").click()
    expect(page.locator("#sweep-plot")).to_be_visible()
    assert page.locator("#sweep-plot").bounding_box()["height"] < 80
    page.get_by_role("tab", name="Trigger map").click()
    for elem_id in ("trigger-map-pinned-a", "trigger-map-selected", "trigger-map-plot"):
        expect(page.locator(f"#{elem_id}")).to_be_visible()
        assert page.locator(f"#{elem_id}").bounding_box()["height"] < 80, elem_id


def test_gallery_captions_show_the_similarity_in_full(page: Page):
    page.get_by_role("tab", name="Replicate").click()
    page.locator("#replicate-seeds input").fill("2")
    page.locator("#replicate-run").click()
    caption = page.locator("#replicate-gallery .caption-label").first
    expect(caption).to_contain_text("similarity (pixel correlation) 0.", timeout=120_000)
    white_space, overflow = caption.evaluate("e => [getComputedStyle(e).whiteSpace, e.scrollWidth - e.clientWidth]")
    assert white_space == "normal" and overflow <= 0
    assert page.locator("#replicate-gallery").bounding_box()["height"] > 80  # it holds the generations now


def test_clicking_a_trigger_on_the_map_selects_it_in_the_map_and_inside(page: Page):
    page.get_by_role("tab", name="Trigger map").click()
    page.locator("#trigger-map-load").click()  # the shipped set of the first image, the shown defaults
    points = page.locator("#trigger-map-plot .scatterlayer .trace").first.locator("path.point")
    expect(points).to_have_count(8, timeout=120_000)
    points.nth(2).click(force=True)  # plotly's hover layer lies above the points
    expect(page.locator("#trigger-map-index input")).to_have_value("2")
    expect(page.locator("#trigger-map-selected-summary")).to_contain_text("Trigger 2 replicates", timeout=120_000)
    page.get_by_role("tab", name="Inside").click()
    expect(page.locator("#inside-trigger input")).to_have_value("2")
