"""NeMo's fit on whole models: settings fitted to small latents, and each prompt's result cached by the weights and
the settings."""

import pytest
import torch

from analysis.localize.nemo import NeMo
from analysis.model import load_model
from tiny_sd import REFERENCE_PROMPTS, SET_CAPTIONS
from test_nemo import PROMPT, count_unet_rows


@pytest.fixture(scope="module")
def tiny_sd(tiny_sd_folder):
    return load_model(tiny_sd_folder)


def test_auto_fits_the_ms_ssim_window_to_small_latents_and_records_it(tiny_sd, tmp_path):
    # 8-pixel latents: 3 scales end at 2x2, so no window of at least 3 fits; 2 scales end at 4x4, where 3x3 does.
    model = NeMo(reference_prompts=REFERENCE_PROMPTS, steps=3, theta_start=1.5, refine=False,
                 calibration_seeds=[0, 1], cache_dir=tmp_path).fit(tiny_sd, SET_CAPTIONS[0], seeds=[0, 1])
    settings = model.mask_.parameters["settings"]
    assert settings["name"] == "authors" and settings["ms_ssim"] == "torchmetrics"
    assert (settings["window"], settings["scales"]) == (3, 2)
    assert settings["fitted"] == "3x3 window at 2 scales: the 11x11 window at 3 scales does not fit 8-pixel latents"


@pytest.mark.parametrize("given", [dict(window=11), dict(scales=3), dict(window=5, scales=2),
                                   dict(settings="authors")])
def test_a_window_that_does_not_fit_is_refused_when_given(tiny_sd, tmp_path, given):
    with pytest.raises(ValueError, match="smaller than the .* SSIM window: pass a smaller window or fewer scales"):
        NeMo(reference_prompts=REFERENCE_PROMPTS, steps=3, cache_dir=tmp_path, **given).fit(tiny_sd, SET_CAPTIONS[0])


def test_a_prompt_s_result_is_cached_by_weights_and_settings(tiny_handle, tmp_path):
    def fit(**settings):
        rows, hook = count_unet_rows(tiny_handle.unet)
        try:
            model = NeMo(threshold=-1.0, steps=4, theta_start=1.5, scales=2, cache_dir=tmp_path, **settings).fit(
                tiny_handle, PROMPT, seeds=[0, 1])
        finally:
            hook.remove()
        return model, sum(rows)

    first, spent = fit()  # the reference statistics first (one row per held-out prompt), then the prompt's search
    assert spent == len(tiny_handle.held_out_prompts) + first.unet_evaluations_ and len(first.trace_) == 2
    again, spent = fit()
    assert spent == 0  # read back: the same mask, trace and criterion, not one UNet call
    for name, removed in first.mask_.removed.items():
        assert torch.equal(again.mask_.removed[name], removed)
    assert again.trace_ == first.trace_ and again.similarity_ == first.similarity_
    assert again.mask_.parameters == first.mask_.parameters
    # Another setting, or other weights, computes again.
    _, spent = fit(refine=False)
    assert spent > 0
    weight = next(tiny_handle.unet.parameters())
    with torch.no_grad():
        weight.add_(1e-3)
        try:
            _, spent = fit()
        finally:
            weight.sub_(1e-3)
    assert spent > 0
