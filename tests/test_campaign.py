"""Campaigns over prompt lists: prompt lists, resuming after a kill, and the same table locally and on Ray."""

from __future__ import annotations

import json

import pytest

from analysis import campaign
from analysis.campaign import load_campaign, load_items, run_campaign


@pytest.fixture(scope="module")
def items(tiny_model_folder, tmp_path_factory):
    """The tiny model's 2 memorized captions plus 2 typed free prompts (so the table has VM/TM rows)."""
    listing = tmp_path_factory.mktemp("prompts") / "prompts.json"
    listing.write_text(json.dumps([
        {"id": "free-a", "prompt": "a small red circle on a white background", "type": "TM"},
        {"id": "free-b", "prompt": "a photo of the red lighthouse", "type": "VM"},
    ]))
    return load_items("bundled", model=str(tiny_model_folder)) + load_items(listing)


@pytest.fixture(scope="module")
def config(tiny_model_folder):
    return {"seeds": [0, 1], "model": str(tiny_model_folder), "device": "cpu", "dtype": "float32"}


@pytest.fixture(scope="module")
def local_summary(items, config, tmp_path_factory):
    return run_campaign(items, "replicate", config, tmp_path_factory.mktemp("local"))


def test_prompt_lists(tiny_model_folder, tmp_path):
    bundled = load_items("bundled", model=str(tiny_model_folder))
    assert [item["image"] for item in bundled] == [0, 1]
    shipped = load_items("sd14-memorized")
    assert len(shipped) == 500 and {item["type"] for item in shipped} == {"VM", "TM"}
    assert sum(item["type"] == "VM" for item in shipped) == 112
    (tmp_path / "p.csv").write_text("prompt,type\na cat,VM\na dog,TM\n")
    assert load_items(tmp_path / "p.csv") == [dict(id="0", prompt="a cat", type="VM"), dict(id="1", prompt="a dog", type="TM")]
    (tmp_path / "p.txt").write_text("a cat")
    with pytest.raises(ValueError, match=".csv or .json"):
        load_items(tmp_path / "p.txt")
    with pytest.raises(FileNotFoundError):
        load_items("sd15-everything")


def test_table_has_every_group(local_summary):
    rows = {row["group"]: row for row in local_summary["table"]}
    assert set(rows) == {"all", "TM", "VM"}
    assert rows["all"]["items"] == 4 and rows["VM"]["items"] == 1
    assert local_summary["computed"] == 4
    assert "| all (4 of 4 scored) |" in local_summary["table_markdown"]


def test_killed_campaign_resumes_with_only_the_missing_items(items, config, local_summary, tmp_path, monkeypatch):
    real_run_one = campaign.run_one
    calls = []

    def dies_after_two(item, method, config):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the kill
        calls.append(item["id"])
        return real_run_one(item, method=method, config=config)

    monkeypatch.setattr(campaign, "run_one", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_campaign(items, "replicate", config, tmp_path)
    assert sorted(path.stem for path in (tmp_path / "items").glob("*.json")) == sorted(calls)
    assert not list((tmp_path / "items").glob("*.tmp"))
    halfway = load_campaign(tmp_path)  # what the app shows of a killed campaign
    assert halfway["method"] == "replicate" and len(halfway["results"]) == 2 and halfway["table"][0]["items"] == 2

    resumed = []
    monkeypatch.setattr(campaign, "run_one", lambda item, method, config: resumed.append(item["id"]) or
                        real_run_one(item, method=method, config=config))
    summary = run_campaign(items, "replicate", config, tmp_path)
    assert sorted(resumed) == sorted(item["id"] for item in items if item["id"] not in calls)
    assert summary["computed"] == 2 and summary["table"] == local_summary["table"]
    with pytest.raises(ValueError, match="other settings"):
        run_campaign(items, "replicate", {**config, "seeds": [5]}, tmp_path)
    with pytest.raises(ValueError, match="not a campaign folder"):
        load_campaign(tmp_path / "items")


def test_ray_gives_the_same_table_as_local(items, config, local_summary, tmp_path):
    ray = pytest.importorskip("ray")
    try:
        summary = run_campaign(items, "replicate", config, tmp_path, executor="ray", workers=2)
    finally:
        ray.shutdown()
    assert summary["computed"] == len(items)
    assert summary["table"] == local_summary["table"]
