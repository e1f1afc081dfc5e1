import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from analysis.sampling import SamplingCancelled, encode_prompts, initial_noise, noise_generators, sample

PROMPTS = ["a photo of the red lighthouse", "a green ring on a black background"]
STEPS = 4


def test_shapes_and_range(tiny_handle):
    result = sample(tiny_handle, PROMPTS, seeds=[0, 1, 2], steps=STEPS)
    assert result.images.shape == (6, 3, 16, 16)
    assert result.images.dtype == torch.float32 and result.images.device.type == "cpu"
    assert result.images.min() >= -1 and result.images.max() <= 1
    assert (result.seeds, result.steps, result.guidance) == ([0, 1, 2], STEPS, 7.0)
    assert result.wen_first_step.shape == (6,) and (result.wen_first_step > 0).all()
    assert sample(tiny_handle, PROMPTS, seeds=[0], steps=STEPS, guidance=1.0).wen_first_step is None


def test_deterministic_per_seed(tiny_handle):
    first = sample(tiny_handle, PROMPTS[:1], seeds=[5, 6], steps=STEPS).images
    again = sample(tiny_handle, PROMPTS[:1], seeds=[5, 6], steps=STEPS).images
    assert torch.equal(first, again)
    assert not torch.allclose(first[0], first[1])


def test_image_independent_of_batch_composition(tiny_handle):
    noise = initial_noise(tiny_handle, noise_generators([1, 3]))
    assert torch.equal(noise[1:], initial_noise(tiny_handle, noise_generators([3])))
    alone = sample(tiny_handle, PROMPTS[1:], seeds=[3], steps=STEPS).images
    in_batch = sample(tiny_handle, PROMPTS, seeds=[1, 3], steps=STEPS).images  # item-major: row 3 is (prompt 1, seed 3)
    chunked = sample(tiny_handle, PROMPTS, seeds=[1, 3], steps=STEPS, batch_size=3).images
    # Same noise; only float rounding differs between batch sizes.
    torch.testing.assert_close(in_batch[3:], alone, rtol=0, atol=1e-4)
    torch.testing.assert_close(chunked, in_batch, rtol=0, atol=1e-4)


def test_embeddings_equal_prompts(tiny_handle):
    embeddings = encode_prompts(tiny_handle, PROMPTS)
    assert embeddings.shape == (2, 77, 32)
    from_prompts = sample(tiny_handle, PROMPTS, seeds=[0, 1], steps=STEPS).images
    from_embeddings = sample(tiny_handle, embeddings, seeds=[0, 1], steps=STEPS).images
    torch.testing.assert_close(from_embeddings, from_prompts, rtol=0, atol=1e-5)
    empty_negative = sample(tiny_handle, embeddings, seeds=[0, 1], steps=STEPS, negative="").images
    torch.testing.assert_close(empty_negative, from_prompts, rtol=0, atol=1e-5)


@pytest.mark.parametrize("guidance, eta", [(7.0, 0.0), (1.0, 0.0), (4.0, 1.0)])
def test_matches_diffusers_pipeline(tiny_handle, guidance, eta):
    h = tiny_handle
    # A scheduler of the pipeline's own, so the shared handle's stays untouched.
    pipe = StableDiffusionPipeline(vae=h.codec, text_encoder=h.text_encoder, tokenizer=h.tokenizer, unet=h.unet,
                                   scheduler=DDIMScheduler.from_config(h.scheduler.config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    seeds = [0, 7]
    generators = [torch.Generator().manual_seed(seed) for _ in PROMPTS for seed in seeds]
    theirs = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance, eta=eta,
                  num_images_per_prompt=len(seeds), generator=generators, output_type="pt").images
    ours = sample(h, PROMPTS, seeds=seeds, steps=STEPS, guidance=guidance, eta=eta).images
    torch.testing.assert_close(ours, theirs * 2 - 1, rtol=0, atol=1e-5)


def test_callback_sees_every_step(tiny_handle):
    seen = []
    sample(tiny_handle, PROMPTS, seeds=[0], steps=STEPS, callback=lambda step: seen.append(step))
    assert [step.index for step in seen] == list(range(STEPS))
    assert all(step.total == STEPS and step.latents.shape == (2, 3, 16, 16) for step in seen)
    assert torch.equal(seen[1].latents, seen[0].next_latents)
    assert tiny_handle.scheduler.num_inference_steps is None  # the handle's scheduler is left alone


def test_cancellation_stops_sampling(tiny_handle):
    seen = []

    def stop_after_two(step):
        seen.append(step.index)
        if step.index == 1:
            raise SamplingCancelled

    with pytest.raises(SamplingCancelled):
        sample(tiny_handle, PROMPTS, seeds=[0], steps=STEPS, callback=stop_after_two)
    assert seen == [0, 1]


def test_bad_conditioning_errors(tiny_handle):
    with pytest.raises(TypeError, match=r"\[prompt\]"):
        sample(tiny_handle, PROMPTS[0], seeds=[0], steps=STEPS)
    with pytest.raises(ValueError, match="embeddings must have shape"):
        sample(tiny_handle, torch.zeros(1, 77, 8), seeds=[0], steps=STEPS)
    with pytest.raises(ValueError, match="no seeds"):
        sample(tiny_handle, PROMPTS, seeds=[], steps=STEPS)
    with pytest.raises(ValueError, match="negative embeddings need 1 or 2 rows"):
        sample(tiny_handle, PROMPTS, seeds=[0], steps=STEPS, negative=torch.zeros(3, 77, 32))
