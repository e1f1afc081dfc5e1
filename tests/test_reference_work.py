"""First-use reference work on a model (the Wen band's reference distributions, Wanda's reference norms): run over
a bounded sample of the model's reference prompts, with progress that says the real total and that it is done
once per model, and kept batch by batch when it is stopped."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from analysis.detectors import REFERENCE_BATCH, reference_scores
from analysis.localize import ONCE_PER_MODEL, REFERENCE_SAMPLE
from analysis.localize.wanda import Wanda
from analysis.progress import TaskProgress
from analysis.sampling import SamplingCancelled

STEPS, GUIDANCE, SEEDS = 2, 4.0, [0]


def with_prompts(handle, count: int):
    """`handle` with `count` reference prompts, as a model without its own list gets SD v1.4's 500."""
    prompts = [f"a {size} shape number {i}" for i, size in zip(range(count), ["small", "large"] * count)]
    return dataclasses.replace(handle, held_out_prompts=prompts)


def test_wanda_runs_a_bounded_sample_and_reports_the_steps_it_records(tiny_handle, tmp_path):
    handle = with_prompts(tiny_handle, REFERENCE_SAMPLE + 20)
    events = []
    wanda = Wanda(sparsity=0.1, record_steps=2, steps=10, cache_dir=tmp_path).fit(handle, handle.memorized[0].caption,
                                                                                   seeds=SEEDS, callback=events.append)
    assert wanda.mask_.parameters["reference_prompts"] == REFERENCE_SAMPLE
    assert events and all(isinstance(event, TaskProgress) for event in events)
    assert {(event.done, event.total) for event in events} == {(1, 2), (2, 2)}  # 2 recorded steps of 10, not "2/10"
    references = [event.message for event in events if "reference" in event.message]
    assert references and all(f"{REFERENCE_SAMPLE} reference prompts" in message and ONCE_PER_MODEL in message
                              for message in references)
    # A list given explicitly is used in full.
    given = Wanda(reference_prompts=handle.held_out_prompts, sparsity=0.1, record_steps=1, steps=10,
                  cache_dir=None).fit(handle, handle.memorized[0].caption, seeds=SEEDS)
    assert given.mask_.parameters["reference_prompts"] == REFERENCE_SAMPLE + 20


def test_the_reference_band_reports_its_whole_run_and_keeps_the_batches_it_finished(tiny_handle, tmp_path):
    handle = with_prompts(tiny_handle, 2 * REFERENCE_BATCH + 3)  # three batches
    batches = 3

    def stop_in_the_second_batch(event):
        assert isinstance(event, TaskProgress) and event.total == batches * STEPS and ONCE_PER_MODEL in event.message
        if event.done > STEPS:
            raise SamplingCancelled

    with pytest.raises(SamplingCancelled):
        reference_scores(handle, STEPS, GUIDANCE, SEEDS, cache_dir=tmp_path, callback=stop_in_the_second_batch)
    resumed = []
    scores = reference_scores(handle, STEPS, GUIDANCE, SEEDS, cache_dir=tmp_path, callback=resumed.append)
    # The first batch was kept: the second run starts at the second.
    assert [event.done for event in resumed] == list(range(STEPS + 1, batches * STEPS + 1))
    fresh = reference_scores(handle, STEPS, GUIDANCE, SEEDS, cache_dir=None)
    assert scores.keys() == fresh.keys() and all(torch.allclose(scores[name], fresh[name]) for name in fresh)
    assert len(scores["noise_gap"]) == 2 * REFERENCE_BATCH + 3
    assert not list(tmp_path.glob("detectors-part-*"))  # the parts go once the whole is cached


def test_the_reference_band_runs_a_bounded_sample(tiny_handle):
    handle = with_prompts(tiny_handle, REFERENCE_SAMPLE + 1)
    assert len(reference_scores(handle, 1, GUIDANCE, SEEDS, cache_dir=None)["noise_gap"]) == REFERENCE_SAMPLE
