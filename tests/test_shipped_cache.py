"""The bundled model's shipped caches: `cached` reads them, and the app's first runs with its defaults find them,
NeMo's masks of every memorized caption included."""

from __future__ import annotations

import pytest
import torch
from gradio_client import Client
from safetensors.torch import save_file

import analysis.detectors
import analysis.localize
import analysis.localize.nemo
import analysis.localize.nemo_delta
import analysis.localize.wanda
import analysis.normal
from analysis.localize import cached, weights_checksum
from analysis.model import load_model
from analysis.normal import GENERATED_PAIRS, default_pairs
from dori_ui.app import build_app
from served import served

USERS = (analysis.detectors, analysis.localize.nemo, analysis.localize.nemo_delta, analysis.localize.wanda,
         analysis.normal)


@pytest.fixture
def shipped_only(monkeypatch, tmp_path):
    """`cached` in every module that uses it, with an empty runs folder in place of the caller's and a computation
    that fails: what a run reads must come from the shipped files. Returns the names read."""
    read: list[str] = []

    def only_shipped(cache_dir, name, key, compute):
        def not_shipped():
            raise AssertionError(f"{name}-{key} is not shipped: run python -m analysis.experiments.cache_assets")

        tensors = cached(tmp_path, name, key, not_shipped)
        read.append(name)
        return tensors

    for module in USERS:
        monkeypatch.setattr(module, "cached", only_shipped)
    return read


def test_a_shipped_file_is_read_when_the_cache_has_none(monkeypatch, tmp_path):
    shipped, cache = tmp_path / "shipped", tmp_path / "cache"
    shipped.mkdir()
    save_file({"x": torch.ones(2)}, str(shipped / "thing-abc.safetensors"))
    monkeypatch.setattr(analysis.localize, "SHIPPED_CACHE_DIR", shipped)

    def compute():
        raise AssertionError("computed although shipped")

    assert torch.equal(cached(cache, "thing", "abc", compute)["x"], torch.ones(2))
    assert not cache.exists()  # read in place, not copied
    # The runs folder's own file comes first; no cache at all computes.
    save_file({"x": torch.zeros(2)}, str(tmp_path / "thing-abc.safetensors"))
    assert torch.equal(cached(tmp_path, "thing", "abc", compute)["x"], torch.zeros(2))
    assert torch.equal(cached(None, "thing", "abc", lambda: {"x": torch.full((2,), 3.0)})["x"], torch.full((2,), 3.0))
    # A key that is not shipped is computed and written to the runs folder.
    assert torch.equal(cached(cache, "thing", "other", lambda: {"x": torch.full((2,), 4.0)})["x"], torch.full((2,), 4.0))
    assert (cache / "thing-other.safetensors").is_file()


def test_the_weights_checksum_does_not_depend_on_how_the_sum_is_split():
    weights = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    assert weights_checksum([weights]) == weights_checksum(list(weights.split(7)))
    changed = weights.clone()
    changed[0] += 1e-4
    assert weights_checksum([changed]) != weights_checksum([weights])


def test_the_app_s_first_runs_with_its_defaults_read_the_shipped_caches(shipped_only):
    handle = load_model()
    with served(build_app(handle)) as url:
        client = Client(url, verbose=False)
        client.predict(api_name="/replicate")  # the gallery, then the Wen curve's reference band
        assert shipped_only == ["detectors"]
        client.predict(method_label="Wanda (weights)", api_name="/mitigate")
        assert shipped_only[1:] == ["wanda-norms"]
        # NeMo's mask of each memorized caption, with the view's other defaults: no criterion check to run.
        for caption in [m.caption for m in handle.memorized]:
            del shipped_only[2:]
            client.predict(prompt_text=caption, method_label="NeMo (neurons)", eval_count=1, api_name="/mitigate")
            assert shipped_only[2:] == ["nemo-stats", "nemo-threshold", "nemo-mask"]


def test_the_fine_tune_view_s_normal_pairs_are_shipped(shipped_only):
    handle = load_model()
    pairs = default_pairs(handle)
    assert shipped_only == ["normal-pairs"] and len(pairs.images) == GENERATED_PAIRS
