import dataclasses

import pytest
import torch

from analysis.dori import DoriSearch, Start, evaluate, token_distances
from analysis.sampling import SamplingCancelled, encode_prompts, sample

STEPS = 4


@pytest.fixture(scope="module")
def target(tiny_handle):
    return tiny_handle.memorized[0]


def test_search_lowers_the_loss(tiny_handle, target):
    # The tiny model is untrained and its output depends little on the text: a large lr shows the descent.
    result = DoriSearch(lr=0.5, steps=20, batch_size=4).fit(tiny_handle, target.image, [Start.random(0)])
    assert result.losses.shape == (20, 1)
    assert result.losses[-5:].mean() < 0.98 * result.losses[:5].mean()
    assert result.embeddings.shape == result.starts.shape == (1, 77, 32)


def test_only_the_chosen_tokens_move(tiny_handle, target):
    chosen = [1, 2, 5]
    result = DoriSearch(steps=STEPS, batch_size=2, tokens=chosen).fit(tiny_handle, target.image, [Start.random(0)])
    fixed = [i for i in range(77) if i not in chosen]
    assert torch.equal(result.embeddings[:, fixed], result.starts[:, fixed])
    assert (result.from_start.l2[0, chosen] > 0).all()
    assert (result.from_start.l2[0, fixed] == 0).all()
    with pytest.raises(ValueError, match="distinct positions"):
        DoriSearch(tokens=[3, 3]).fit(tiny_handle, target.image, [Start.random(0)])


def test_cancellation_stops_within_one_step(tiny_handle, target):
    seen = []

    def stop_after_two(step):
        seen.append((step.index, step.total, tuple(step.loss.shape), tuple(step.distance.shape)))
        if step.index == 1:
            raise SamplingCancelled

    with pytest.raises(SamplingCancelled):
        DoriSearch(steps=10, batch_size=2).fit(tiny_handle, target.image, [Start.random(0), Start.random(1)],
                                              callback=stop_after_two)
    assert seen == [(0, 10, (2,), (2,)), (1, 10, (2,), (2,))]


def test_seeded_and_batched_starts_match_separate_runs(tiny_handle, target):
    search = DoriSearch(steps=STEPS, batch_size=2, seed=3)
    starts = [Start.random(0), Start.prompt(target.caption)]
    together = search.fit(tiny_handle, target.image, starts)
    again = search.fit(tiny_handle, target.image, starts)
    assert torch.equal(together.embeddings, again.embeddings) and torch.equal(together.losses, again.losses)
    # Start i draws its noise with seed `seed + i`: the same draws as a run of its own. Only the UNet's
    # float rounding differs with the batch, and Adam's normalised steps carry it to about 1e-4.
    for i, start in enumerate(starts):
        alone = DoriSearch(steps=STEPS, batch_size=2, seed=3 + i).fit(tiny_handle, target.image, [start])
        torch.testing.assert_close(alone.embeddings[0], together.embeddings[i], rtol=0, atol=1e-3)
        torch.testing.assert_close(alone.losses[:, 0], together.losses[:, i], rtol=0, atol=1e-4)
    other_seed = DoriSearch(steps=STEPS, batch_size=2, seed=4).fit(tiny_handle, target.image, starts[:1])
    assert not torch.allclose(other_seed.embeddings[0], together.embeddings[0])


def test_starts_and_distances(tiny_handle, target):
    prompt_embedding = encode_prompts(tiny_handle, [target.caption])[0]
    assert torch.equal(Start.prompt(target.caption).resolve(tiny_handle), prompt_embedding)
    assert torch.equal(Start.embedding(prompt_embedding).resolve(tiny_handle), prompt_embedding)
    random = Start.random(7).resolve(tiny_handle)
    assert torch.equal(random, Start.random(7).resolve(tiny_handle))
    empty_std = encode_prompts(tiny_handle, [""])[0].std()
    assert random.std() == pytest.approx(empty_std.item(), rel=0.05)
    assert Start.random(7, scale=2.0).resolve(tiny_handle).std() == pytest.approx(2.0, rel=0.05)
    assert Start.random(7, scale=0.5).describe() == dict(kind="random", seed=7, scale=0.5)

    result = DoriSearch(steps=2, batch_size=2).fit(tiny_handle, target.image, [Start.prompt(target.caption)],
                                                   prompt=target.caption)
    # Started at the prompt: distances from the start and from the prompt are the same thing.
    torch.testing.assert_close(result.from_prompt.l2, result.from_start.l2)
    assert result.from_start.l2.shape == result.from_start.linf.shape == result.from_start.cosine.shape == (1, 77)
    assert (result.from_start.linf <= result.from_start.l2 + 1e-6).all()
    itself = token_distances(result.starts, result.starts[0])
    assert (itself.l2 == 0).all() and torch.allclose(itself.cosine, torch.ones(1, 77))


def test_evaluate_generates_and_scores_each_embedding(tiny_handle, target):
    embeddings = encode_prompts(tiny_handle, [target.caption, tiny_handle.held_out_prompts[0]])
    generated = evaluate(tiny_handle, embeddings, target.image, seeds=[0, 1], steps=2)
    assert generated.images.shape == (2, 2, 3, 16, 16)
    assert generated.similarities.shape == generated.replicated.shape == (2, 2) and generated.rates.shape == (2,)
    alone = sample(tiny_handle, embeddings[1:], [0, 1], steps=2, guidance=tiny_handle.default_guidance).images
    torch.testing.assert_close(generated.images[1], alone, rtol=0, atol=1e-4)


def test_embedding_and_adam_state_stay_float32_with_a_half_precision_unet(tiny_handle, monkeypatch):
    """At SD size the UNet runs in fp16/bf16; the search's own state must not (Adam's small steps would round away).
    On the CPU bfloat16 stands in for float16."""
    import copy

    import analysis.dori

    half = dataclasses.replace(tiny_handle, unet=copy.deepcopy(tiny_handle.unet).to(torch.bfloat16),
                               dtype=torch.bfloat16)
    optimizers = []

    class RecordedAdam(torch.optim.Adam):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)

    monkeypatch.setattr(analysis.dori.torch.optim, "Adam", RecordedAdam)
    result = DoriSearch(steps=2, batch_size=2).fit(half, tiny_handle.memorized[0].image, [Start.random(0)])
    (optimizer,) = optimizers
    (parameter,) = optimizer.param_groups[0]["params"]
    state = optimizer.state[parameter]
    assert parameter.dtype == state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert result.embeddings.dtype == torch.float32 and torch.isfinite(result.losses).all()
    assert next(half.unet.parameters()).dtype == torch.bfloat16


def test_gradient_checkpointing_gives_the_same_search_and_is_switched_off_after(tiny_handle):
    image, starts = tiny_handle.memorized[0].image, [Start.random(0)]
    plain = DoriSearch(steps=2, batch_size=2).fit(tiny_handle, image, starts)
    checkpointed = DoriSearch(steps=2, batch_size=2, gradient_checkpointing=True).fit(tiny_handle, image, starts)
    torch.testing.assert_close(checkpointed.embeddings, plain.embeddings)
    assert not tiny_handle.unet.is_gradient_checkpointing
