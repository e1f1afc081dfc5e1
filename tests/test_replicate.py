import dataclasses

import pytest
import torch

from analysis.metrics import REPLICATION_THRESHOLD
from analysis.model import load_model
from analysis.replicate import replicate, training_images
from analysis.sampling import sample

STEPS = 3


def test_training_image_is_compared_with_itself_only(tiny_handle):
    report = replicate(tiny_handle, 1, seeds=[0, 1], steps=STEPS, guidance=5.0)
    assert report.prompt == tiny_handle.memorized[1].caption
    assert report.images.shape == (2, 3, 16, 16)
    assert report.reference_captions == [report.prompt]
    assert report.replication.similarities.shape == (2,)
    assert report.replication.replicated.tolist() == (report.replication.similarities > REPLICATION_THRESHOLD).tolist()
    assert report.noise_gap_per_step.shape == (2, STEPS)
    assert all("similarity" in line and "replicated" in line for line in report.captions())
    assert "of 2 seeds replicate the training image" in report.summary()


def test_free_prompt_is_compared_with_every_training_image(tiny_handle):
    report = replicate(tiny_handle, "a green ring on a black background", seeds=[3], steps=STEPS, guidance=5.0)
    assert report.reference_captions == [m.caption for m in tiny_handle.memorized]
    nearest = report.replication.nearest.item()
    assert f"“{tiny_handle.memorized[nearest].caption}”" in report.captions()[0]
    expected = sample(tiny_handle, [report.prompt], [3], steps=STEPS, guidance=5.0)
    torch.testing.assert_close(report.images, expected.images, rtol=0, atol=0)
    # The per-step gaps come from the same loop as `sample`'s Wen magnitude.
    torch.testing.assert_close(report.noise_gap_per_step[:, 0], expected.wen_first_step, rtol=0, atol=0)


def test_defaults_callback_and_no_guidance(tiny_handle):
    handle = dataclasses.replace(tiny_handle, default_steps=2, default_guidance=1.0)
    seen = []
    report = replicate(handle, 0, seeds=[0], callback=lambda step: seen.append(step.index))
    assert (report.steps, report.guidance, seen) == (2, 1.0, [0, 1])
    assert report.noise_gap_per_step is None and "Wen" not in report.summary()


def test_model_without_training_images(tiny_handle):
    handle = dataclasses.replace(tiny_handle, memorized=[])
    report = replicate(handle, "a green ring on a black background", seeds=[0, 1], steps=STEPS)
    assert report.replication is None
    assert report.captions() == ["seed 0", "seed 1"]
    assert "no known training images" in report.summary()


def test_bad_input(tiny_handle):
    with pytest.raises(ValueError, match="prompt is empty"):
        replicate(tiny_handle, "  ", seeds=[0], steps=STEPS)
    with pytest.raises(ValueError, match="training image 2 does not exist"):
        replicate(tiny_handle, 2, seeds=[0], steps=STEPS)
    assert training_images(tiny_handle).shape == (2, 3, 16, 16)


def test_bundled_model_replicates_a_memorized_caption():
    handle = load_model()
    report = replicate(handle, 0, seeds=range(4))
    assert report.prompt == "portrait of astronaut eileen collins beside the american flag"
    assert (report.steps, report.guidance) == (handle.default_steps, handle.default_guidance)
    assert report.replication.replicated.sum() >= 3, report.captions()
