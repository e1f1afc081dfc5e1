"""A v-prediction model (SD 2.x at 768 px): every analysis that compares a prediction with noise uses the model's
prediction type. The tiny v-prediction folder's UNet output is v; each test recomputes the analysis by hand."""

from __future__ import annotations

import pytest
import torch

from analysis.dori import DoriSearch, Start
from analysis.finetune import denoising_loss
from analysis.localize.nemo_delta import DeltaReading, noise_differences
from analysis.wen_score import wen_score
from analysis.model import load_model
from analysis.sampling import as_epsilon, encode_prompts, initial_noise, noise_generators, sample

STEPS = 3


@pytest.fixture(scope="module")
def vpred(tiny_sd_vpred_folder, memorized_set_dir):
    handle = load_model(tiny_sd_vpred_folder, memorized=memorized_set_dir)
    assert handle.scheduler.config.prediction_type == "v_prediction"
    return handle


def first_step(handle, seeds):
    """x_T, the first timestep and √ᾱ_t of `sample`'s STEPS-step schedule."""
    scheduler = type(handle.scheduler).from_config(handle.scheduler.config)
    scheduler.set_timesteps(STEPS)
    t = scheduler.timesteps[0]
    x_t = initial_noise(handle, noise_generators(seeds)) * scheduler.init_noise_sigma
    return x_t, t, scheduler.alphas_cumprod[t].sqrt()


def test_as_epsilon_inverts_the_velocity(vpred):
    z0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([10, 500, 990])
    x_t = vpred.scheduler.add_noise(z0, noise, timesteps)
    velocity = vpred.scheduler.get_velocity(z0, noise, timesteps)
    torch.testing.assert_close(as_epsilon(vpred.scheduler, velocity, x_t, timesteps), noise, atol=1e-5, rtol=1e-4)


def test_dori_loss_targets_the_velocity(vpred):
    image, caption = vpred.memorized[0].image, vpred.memorized[0].caption
    result = DoriSearch(steps=1, batch_size=2, seed=3).fit(vpred, image, [Start.prompt(caption)])
    generator = torch.Generator().manual_seed(3)  # start 0 draws (t, ε) from seed + 0, as `DoriSearch._draw`
    timesteps = torch.randint(0, 1000, (2,), generator=generator)
    noise = torch.randn((2, *vpred.latent_shape), generator=generator)
    z0 = vpred.encode_images(image[None]).expand(2, -1, -1, -1)
    x_t = vpred.scheduler.add_noise(z0, noise, timesteps)
    output = vpred.unet(x_t, timesteps, encoder_hidden_states=encode_prompts(vpred, [caption]).expand(2, -1, -1)).sample
    velocity = vpred.scheduler.get_velocity(z0, noise, timesteps)
    expected = (output - velocity).square().mean()
    torch.testing.assert_close(result.losses[0, 0], expected, atol=1e-5, rtol=1e-4)
    assert not torch.isclose(result.losses[0, 0], (output - noise).square().mean(), rtol=1e-2)


def test_finetuning_loss_targets_the_velocity(vpred):
    images, text = vpred.memorized[0].image[None], encode_prompts(vpred, [vpred.memorized[0].caption])
    loss = denoising_loss(vpred, vpred.unet, images, text, torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    z0 = vpred.encode_images(images)
    timesteps = torch.randint(0, 1000, (1,), generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    x_t = vpred.scheduler.add_noise(z0, noise, timesteps)
    output = vpred.unet(x_t, timesteps, encoder_hidden_states=text).sample
    expected = (output - vpred.scheduler.get_velocity(z0, noise, timesteps)).square().mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)


def test_nemo_delta_is_read_as_noise(vpred):
    text = encode_prompts(vpred, [vpred.memorized[0].caption])
    x_t, t, root_alpha = first_step(vpred, [0, 1])
    velocity = vpred.unet(x_t, t, encoder_hidden_states=text.expand(2, -1, -1)).sample
    delta = root_alpha * velocity + (1 - root_alpha**2).sqrt() * x_t - x_t  # ε − x_t
    low, high = delta.amin(dim=(2, 3), keepdim=True), delta.amax(dim=(2, 3), keepdim=True)
    # Both readings, at the first step: x_T itself (the authors') and after no DDIM step (the pixel reading).
    for advance in (False, True):
        deltas = noise_differences(vpred, text, [0, 1], DeltaReading(STEPS, 0, advance_latents=advance))
        torch.testing.assert_close(deltas, (delta - low) / (high - low), atol=1e-4, rtol=1e-4)


def test_wen_score_is_the_noise_gap_not_the_velocity_gap(vpred):
    prompt, guidance = vpred.memorized[1].caption, 7.5
    score = wen_score(vpred, [prompt], seeds=[0], steps=STEPS, n_score_steps=1, guidance=guidance)
    x_t, t, root_alpha = first_step(vpred, [0])
    both = vpred.unet(torch.cat([x_t, x_t]), t,
                      encoder_hidden_states=torch.cat([encode_prompts(vpred, [""]), encode_prompts(vpred, [prompt])]))
    v_uncond, v_text = both.sample.chunk(2)
    expected = root_alpha * (v_text - v_uncond).flatten().norm()  # ε_text − ε_uncond = √ᾱ_t (v_text − v_uncond)
    torch.testing.assert_close(score[0, 0], expected, atol=1e-5, rtol=1e-4)
    assert sample(vpred, [prompt], [0], steps=STEPS, guidance=guidance).wen_first_step[0] == pytest.approx(
        expected.item(), rel=1e-4)
