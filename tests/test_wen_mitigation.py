"""Wen et al.'s inference-time mitigation on the tiny random model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from analysis.attribution.common import memorization_objective
from analysis.sampling import encode_prompts, sample
from analysis.wen_mitigation import WenMitigation

SEEDS = [0, 1]


@pytest.fixture(scope="module")
def handle(tiny_handle):
    return dataclasses.replace(tiny_handle, default_steps=4, default_guidance=3.0)


def test_mitigation_lowers_the_magnitude_and_changes_the_images(handle):
    caption = handle.memorized[0].caption
    result = WenMitigation(lr=0.05, max_iterations=4, target=0.0).fit(handle, caption, SEEDS)

    assert len(result.trace) == 5 and not result.reached
    assert result.trace[-1] < result.trace[0]
    # The trace is the objective itself: recomputing it on the result gives its last entry.
    recomputed = memorization_objective(handle, SEEDS)(result.embedding[None]).item()
    assert recomputed == pytest.approx(result.trace[-1], rel=1e-4)
    assert torch.equal(result.embedding[0], result.start[0])  # BOS stays fixed
    assert torch.allclose(result.start, encode_prompts(handle, [caption])[0])

    plain = sample(handle, [caption], SEEDS, steps=handle.default_steps, guidance=handle.default_guidance).images
    mitigated = sample(handle, result.embedding[None], SEEDS, steps=handle.default_steps,
                       guidance=handle.default_guidance).images
    assert (plain - mitigated).abs().mean() > 1e-3


def test_stops_once_the_target_is_reached(handle):
    trigger = torch.randn(77, handle.unet.config.cross_attention_dim)
    result = WenMitigation(target=float("inf")).fit(handle, trigger, SEEDS)
    assert result.reached and len(result.trace) == 1
    assert torch.equal(result.embedding, trigger)


def test_default_target_is_the_held_out_prompts_mean(handle):
    expected = memorization_objective(handle, SEEDS)(encode_prompts(handle, handle.held_out_prompts)).mean().item()
    result = WenMitigation(max_iterations=0).fit(handle, handle.memorized[1].caption, SEEDS)
    assert result.target == pytest.approx(expected, rel=1e-5)


def test_clear_errors(handle):
    with pytest.raises(ValueError, match="shape"):
        WenMitigation().fit(handle, torch.zeros(2, 77, 32), SEEDS)
    with pytest.raises(ValueError, match="no seeds"):
        WenMitigation().fit(handle, "a caption", [])
    with pytest.raises(ValueError, match="held-out prompts"):
        WenMitigation().fit(dataclasses.replace(handle, held_out_prompts=[]), "a caption", SEEDS)
