"""Every request limit of `analysis.limits` can be reached: an analysis at its upper limits runs (on a tiny model,
one seed where the limit is not the seeds'), or a model that cannot take it says so."""

from __future__ import annotations

import dataclasses

import pytest
from diffusers import DDIMScheduler

from analysis.limits import (MAX_DENOISING_STEPS, MAX_SEARCH_BATCH, MAX_SEARCH_STEPS, MAX_SEED, MAX_SEEDS,
                             MAX_STARTS)
from analysis.model import load_model
from analysis.sampling import ddim_schedule
from analysis.task_settings import check_limits
from analysis.tasks import run_task


@pytest.fixture(scope="module")
def schedules(tiny_handle, tiny_sd_folder, tiny_sd_vpred_folder):
    """The tiny pixel model (the bundled model's scheduler), SD v1.4's PNDM and SD 2.x's DDIM v-prediction."""
    return {"tiny": tiny_handle, "sd14": load_model(str(tiny_sd_folder)), "sd2": load_model(str(tiny_sd_vpred_folder))}


@pytest.mark.parametrize("name", ["tiny", "sd14", "sd2"])
def test_the_step_limit_fits_each_schedule(schedules, name):
    handle = schedules[name]
    timesteps = ddim_schedule(handle, MAX_DENOISING_STEPS).timesteps
    assert len(timesteps) == MAX_DENOISING_STEPS
    assert 0 <= int(timesteps.min()) and int(timesteps.max()) < handle.scheduler.config.num_train_timesteps


def test_a_schedule_too_short_for_the_steps_says_how_many_it_takes(tiny_sd_folder):
    handle = load_model(str(tiny_sd_folder))  # SD v1.4's steps_offset=1
    short = dataclasses.replace(handle, scheduler=DDIMScheduler.from_config(handle.scheduler.config,
                                                                            num_train_timesteps=20))
    with pytest.raises(ValueError, match="takes at most 19"):
        run_task(short, "replicate", dict(prompt="a photo", seeds=[0], steps=20, guidance=1.0))
    with pytest.raises(ValueError, match="has 20 timesteps"):
        run_task(short, "replicate", dict(prompt="a photo", seeds=[0], steps=21, guidance=1.0))


def test_replicate_at_the_step_limit_on_sd_schedule(schedules):
    record = run_task(schedules["sd14"], "replicate", dict(prompt="a photo", seeds=[0], steps=MAX_DENOISING_STEPS,
                                                           guidance=1.0))
    assert record.config["steps"] == MAX_DENOISING_STEPS and len(record.images) >= 1


@pytest.mark.parametrize("kind, config", [
    ("replicate", dict(seeds=list(range(MAX_SEED - MAX_SEEDS + 1, MAX_SEED + 1)), steps=2)),
    ("sweep", dict(radii=[1.0], directions=MAX_STARTS, seeds=[MAX_SEED], steps=2)),
    ("attack", dict(search=dict(steps=1, batch_size=MAX_SEARCH_BATCH), evaluation_seeds=list(range(MAX_SEEDS)),
                    steps=2)),
])
def test_seeds_starts_and_batches_at_their_limits(tiny_handle, kind, config):
    record = run_task(tiny_handle, kind, dict(image=0, **config))
    assert all(record.config[name] == value or record.config[name] | value == record.config[name]
               for name, value in config.items())


def test_search_steps_keep_their_own_limit_beside_denoising_steps():
    check_limits({"search": {"steps": MAX_SEARCH_STEPS}, "steps": MAX_DENOISING_STEPS})
    check_limits({"parameters": {"dori": {"steps": MAX_SEARCH_STEPS}}})
    with pytest.raises(ValueError, match=f"steps must be at most {MAX_DENOISING_STEPS}"):
        check_limits({"mitigation": {"parameters": {"steps": MAX_DENOISING_STEPS + 1}}})
    with pytest.raises(ValueError, match=f"steps must be at most {MAX_SEARCH_STEPS}"):
        check_limits({"search": {"steps": MAX_SEARCH_STEPS + 1}})
