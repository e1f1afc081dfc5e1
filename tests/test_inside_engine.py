"""Cross-attention maps, the denoising timeline and the detectors (analysis.attention, .timeline, .detectors)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler

from analysis.attention import attention_maps, capture_attention, end_token_index, overlay, token_labels
from analysis.detectors import DETECTORS, NOISE_GAP_PER_STEP, detector_scores, entropy_steps, percentile, reference_scores
from analysis.hooks import cross_attention_layers
from analysis.wen_score import wen_score
from analysis.sampling import SamplingCancelled, encode_prompts, sample
from analysis.timeline import denoising_timeline

STEPS = 5
GUIDANCE = 7.0
CAPTION = "a photo of the red lighthouse"
HELD_OUT = "a green ring on a black background"


class RecordingProcessor:
    """Records softmax(QKᵀ·scale) of the text rows through diffusers' own attention code, then runs the original
    processor: the direct computation the captured maps are checked against."""

    def __init__(self, original, store: list):
        self.original, self.store = original, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)
        rows = hidden_states.shape[0]
        self.store.append(probs.view(rows, attn.heads, *probs.shape[1:])[rows // 2:].mean(dim=1))
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


def direct_attention(handle, conditioning, seeds) -> list[list[torch.Tensor]]:
    """Per step, per layer: the text rows' attention `[rows, pixels, tokens]` read by `RecordingProcessor`."""
    layers = cross_attention_layers(handle.unet)
    originals = {name: layer.processor for name, layer in layers.items()}
    store: list = []
    per_step: list = []
    try:
        for name, layer in layers.items():
            layer.set_processor(RecordingProcessor(originals[name], store))
        sample(handle, conditioning, seeds, steps=STEPS, guidance=GUIDANCE,
               callback=lambda step: (per_step.append(list(store)), store.clear()))
    finally:
        for name, layer in layers.items():
            layer.set_processor(originals[name])
    return per_step


def test_maps_are_shares_of_every_pixel_and_cover_every_token(tiny_handle):
    maps = attention_maps(tiny_handle, CAPTION, seed=0, steps=STEPS, guidance=GUIDANCE)
    size, length = tiny_handle.image_size, tiny_handle.tokenizer.model_max_length
    assert maps.maps.shape == (length, size, size) and len(maps.tokens) == length
    torch.testing.assert_close(maps.maps.sum(dim=0), torch.ones(size, size))
    kinds = [token.kind for token in maps.tokens]
    end = end_token_index(tiny_handle, CAPTION)
    assert kinds[0] == "start" and kinds[end] == "end" and set(kinds[1:end]) == {"word"}
    assert set(kinds[end + 1:]) == {"padding"} and end == len(CAPTION.split()) + 1
    normalised = maps.normalised()
    torch.testing.assert_close(normalised.flatten(1).amax(dim=1), torch.ones(length))
    torch.testing.assert_close(maps.token_means.sum(dim=1), torch.ones(STEPS))
    picture = overlay(maps.image, normalised[1])
    assert picture.shape == maps.image.shape and picture.min() >= -1 and picture.max() <= 1


def test_maps_equal_the_direct_attention_of_the_chosen_layer_and_steps(tiny_handle):
    layer = list(cross_attention_layers(tiny_handle.unet))[1]
    maps = attention_maps(tiny_handle, CAPTION, seed=0, steps=STEPS, guidance=GUIDANCE, layers=[layer],
                          kept_steps=[1, 3], keep_step_maps=True)
    index = list(cross_attention_layers(tiny_handle.unet)).index(layer)
    direct = direct_attention(tiny_handle, [CAPTION], [0])
    side = int(direct[0][index].shape[1] ** 0.5)
    expected = [direct[step][index][0].T.reshape(-1, side, side) for step in (1, 3)]
    size = tiny_handle.unet.config.sample_size
    expected = torch.nn.functional.interpolate(torch.stack(expected), size=(size, size), mode="bilinear",
                                               align_corners=False)
    torch.testing.assert_close(maps.step_maps, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps.maps, expected.mean(dim=0), atol=1e-5, rtol=1e-4)
    assert maps.layers == [layer] and maps.kept_steps == [1, 3]


def test_an_embedding_has_a_map_per_position(tiny_handle):
    embedding = encode_prompts(tiny_handle, [CAPTION])[0] + 0.1
    maps = attention_maps(tiny_handle, embedding, seed=1, steps=STEPS, guidance=GUIDANCE, kept_steps=[STEPS - 1])
    assert {token.kind for token in maps.tokens} == {"position"} and len(maps.tokens) == len(maps.maps)
    torch.testing.assert_close(maps.maps.sum(dim=0), torch.ones_like(maps.maps[0]))
    with pytest.raises(ValueError, match="step indices"):
        attention_maps(tiny_handle, embedding, seed=1, steps=STEPS, guidance=GUIDANCE, kept_steps=[STEPS])
    with pytest.raises(ValueError, match="no cross-attention layers named"):
        attention_maps(tiny_handle, CAPTION, seed=0, steps=STEPS, guidance=GUIDANCE, layers=["down.9.attn.0"])


def test_detectors_match_a_direct_computation(tiny_handle):
    prompts, seeds = [CAPTION, HELD_OUT], [0, 1]
    scores = detector_scores(tiny_handle, prompts, seeds, STEPS, GUIDANCE)
    assert set(scores) == {*DETECTORS, NOISE_GAP_PER_STEP}
    torch.testing.assert_close(scores["noise_gap"].float(), wen_score(tiny_handle, prompts, seeds, STEPS, 1,
                                                                      GUIDANCE)[:, 0])
    direct = direct_attention(tiny_handle, prompts, seeds)
    token_means = torch.stack([torch.stack([layer.mean(dim=1) for layer in step]).mean(dim=0) for step in direct])
    ends = [end_token_index(tiny_handle, prompt) for prompt in prompts for _ in seeds]
    # Ren et al.'s D (detect.py, mode "D"): the late steps' entropy, plus the growth of the end and padding tokens'
    # part of it since the first step.
    late = entropy_steps(STEPS)
    expected_entropy = []
    for row, end in enumerate(ends):
        entropy = [-(a * a.log()).sum() for a in token_means[:, row]]
        padding = [-(a[end:] * a[end:].log()).sum() for a in token_means[:, row]]
        expected_entropy.append(sum(entropy[s] for s in late) / len(late) + sum(padding[s] for s in late) / len(late)
                                - padding[0])
    expected_entropy = torch.stack(expected_entropy).view(2, 2).mean(dim=1)
    torch.testing.assert_close(scores["attention_entropy"].float(), expected_entropy, atol=1e-5, rtol=1e-5)
    expected_bright = token_means[-1][torch.arange(4), ends].view(2, 2).mean(dim=1)
    torch.testing.assert_close(scores["bright_ending"].float(), expected_bright, atol=1e-6, rtol=1e-5)
    assert entropy_steps(50) == list(range(40, 50))


def test_reference_scores_are_cached_per_weights(tiny_handle, tmp_path):
    first = reference_scores(tiny_handle, STEPS, GUIDANCE, [0], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("detectors-*.safetensors"))) == 1
    again = reference_scores(tiny_handle, STEPS, GUIDANCE, [0], cache_dir=tmp_path)
    direct = detector_scores(tiny_handle, tiny_handle.held_out_prompts, [0], STEPS, GUIDANCE)
    assert first[NOISE_GAP_PER_STEP].shape == (len(tiny_handle.held_out_prompts), STEPS)
    torch.testing.assert_close(first[NOISE_GAP_PER_STEP][:, 0], first["noise_gap"])
    for name in (*DETECTORS, NOISE_GAP_PER_STEP):
        torch.testing.assert_close(first[name], again[name])
        torch.testing.assert_close(first[name], direct[name])
    assert percentile(float(first["noise_gap"].max()) + 1, first["noise_gap"]) == 1.0


def test_the_last_predicted_clean_image_is_the_generated_image(tiny_handle):
    # DDIM ends on x̂₀ itself when the final ᾱ is 1; the demo scheduler's is ᾱ_0 < 1.
    config = {**tiny_handle.scheduler.config, "set_alpha_to_one": True}
    handle = dataclasses.replace(tiny_handle, scheduler=DDIMScheduler.from_config(config))
    target = tiny_handle.memorized[0].image
    timeline = denoising_timeline(handle, CAPTION, seed=3, steps=STEPS, guidance=GUIDANCE, target=target)
    generated = sample(handle, [CAPTION], [3], steps=STEPS, guidance=GUIDANCE).images[0]
    assert timeline.frames.shape == (STEPS, 3, handle.image_size, handle.image_size)
    torch.testing.assert_close(timeline.frames[-1], generated)
    torch.testing.assert_close(timeline.image, generated)
    similarity = handle.replication_metric(generated[None], target).similarities[0].item()
    assert timeline.similarities[-1].item() == pytest.approx(similarity, abs=1e-6)
    assert timeline.final_similarity == pytest.approx(similarity, abs=1e-6)
    assert timeline.lock_in_step(-2.0) == 0 and timeline.lock_in_step(2.0) is None


def test_hooks_are_removed_after_a_raise(tiny_handle):
    modules = list(tiny_handle.unet.modules())
    processors = {name: layer.processor for name, layer in cross_attention_layers(tiny_handle.unet).items()}

    def stop(step):
        if step.index == 1:
            raise SamplingCancelled

    with pytest.raises(SamplingCancelled):
        capture_attention(tiny_handle, [CAPTION], [0], STEPS, GUIDANCE, callback=stop)
    with pytest.raises(SamplingCancelled):
        attention_maps(tiny_handle, CAPTION, 0, STEPS, GUIDANCE, callback=stop)
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in modules)
    assert {name: layer.processor for name, layer in cross_attention_layers(tiny_handle.unet).items()} == processors
    assert token_labels(tiny_handle, None)[0].kind == "position"
