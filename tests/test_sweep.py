import torch

from analysis.dori import evaluate
from analysis.sampling import encode_prompts
from analysis.sweep import perturbation_sweep, random_directions

STEPS = 2


def test_directions_have_unit_norm():
    directions = random_directions(3, (77, 32), seed=0)
    assert directions.shape == (3, 77, 32)
    torch.testing.assert_close(directions.flatten(1).norm(dim=1), torch.ones(3))
    assert torch.equal(directions, random_directions(3, (77, 32), seed=0))


def test_sweep_shapes_and_radius_zero_is_the_prompt(tiny_handle):
    target = tiny_handle.memorized[0]
    done = []
    result = perturbation_sweep(tiny_handle, target.caption, target.image, radii=[0.0, 5.0, 50.0], directions=2,
                                seeds=[0, 1], steps=STEPS, callback=done.append)
    # Each radius's denoising steps, counted among the radii (the step in the message), then the radius done.
    radii_done = [event.done for event in done if not event.message.split(": ")[-1].startswith("denoising")]
    assert radii_done == [1, 2, 3] and {(event.stage, event.total) for event in done} == {("sweep", 3)}
    assert [event.message for event in done[:STEPS]] == [f"radius 0: denoising step {i} of {STEPS}"
                                                         for i in range(1, STEPS + 1)]
    assert all(event.done == 0 for event in done[:STEPS])
    assert result.radii == [0.0, 5.0, 50.0] and result.seeds == [0, 1]
    assert result.similarities.shape == result.replicated.shape == (3, 2, 2)
    assert result.rates().shape == result.mean_similarities().shape == (3,)
    assert result.direction_rates().shape == (3, 2)
    embedding = encode_prompts(tiny_handle, [target.caption])
    assert result.embedding_norm == torch.linalg.norm(embedding).item()
    unperturbed = evaluate(tiny_handle, embedding, target.image, seeds=[0, 1], steps=STEPS).similarities
    for direction in range(2):
        torch.testing.assert_close(result.similarities[0, direction], unperturbed[0], rtol=0, atol=1e-4)
    assert not torch.allclose(result.similarities[2], result.similarities[0])
