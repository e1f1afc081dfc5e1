import math

import pytest
import torch

from analysis.discrepancy import activation_discrepancy, discrepancy, first_step_outputs
from analysis.hooks import hook_points
from analysis.sampling import encode_prompts


def test_discrepancy_of_hand_made_activations():
    activations = {
        # Two equal rows and one orthogonal row of the same norm: pair distances 0, √2·2, √2·2.
        "layer a": torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]]),
        # [rows, tokens, channels] is flattened per row: distance 5 between the two rows.
        "layer b": torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[3.0, 0.0], [0.0, 4.0]]]),
    }
    result = discrepancy(activations)
    assert result.layers == ["layer a", "layer b"]
    assert result.mean_distance[0].item() == pytest.approx(2 * 2 * math.sqrt(2) / 3)
    assert result.mean_norm[0].item() == pytest.approx(2.0)
    assert result.relative[0].item() == pytest.approx(2 * math.sqrt(2) / 3)
    assert result.mean_distance[1].item() == pytest.approx(5.0) and result.mean_norm[1].item() == pytest.approx(2.5)
    assert result.as_dict()["layer b"]["relative"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="layer c"):
        discrepancy({"layer c": torch.ones(1, 3)})


def test_first_step_outputs_record_one_row_per_embedding(tiny_handle):
    embeddings = encode_prompts(tiny_handle, [m.caption for m in tiny_handle.memorized] + tiny_handle.held_out_prompts[:1])
    outputs = first_step_outputs(tiny_handle, embeddings, layers="ff", seed=1)
    layers = hook_points(tiny_handle.unet, "ff")
    assert list(outputs) == list(layers)
    assert all(rows.shape[0] == 3 and rows.dtype == torch.float32 for rows in outputs.values())
    # Batched or one at a time, an embedding's activations are the same: the noise and timestep are fixed.
    alone = first_step_outputs(tiny_handle, embeddings[1:2], layers="ff", seed=1)
    assert all(torch.allclose(outputs[name][1], alone[name][0], atol=1e-5) for name in layers)

    same = activation_discrepancy(tiny_handle, embeddings[[0, 0]], layers="value")
    assert torch.allclose(same.mean_distance, torch.zeros(len(same.layers)))
    different = activation_discrepancy(tiny_handle, embeddings, layers="value")
    assert (different.mean_distance > 0).all() and different.layers == list(hook_points(tiny_handle.unet, "value"))
