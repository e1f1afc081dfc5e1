import math

import pytest
import torch

from analysis.agreement import as_neurons, iou_matrix, localize_each
from analysis.localize.wanda import Wanda
from analysis.masks import Mask
from analysis.sampling import encode_prompts


def bools(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


def mask(**removed: torch.Tensor) -> Mask:
    return Mask(removed, method="test", prompt="p", model="m")


def test_iou_matrix_of_hand_made_masks_flags_empty_layers():
    masks = [mask(a=bools(1, 1, 0, 0), b=bools(0, 0)),
             mask(a=bools(0, 1, 1, 0), b=bools(0, 0)),
             mask(a=bools(0, 0, 0, 0), b=bools(1, 0))]
    matrix = iou_matrix(masks)
    assert matrix.layers == ["a", "b"] and matrix.values.shape == (2, 3, 3) and matrix.symmetric
    assert matrix.values[0, 0, 1].item() == pytest.approx(1 / 3) and matrix.values[0, 1, 0].item() == pytest.approx(1 / 3)
    assert matrix.values[0, 0, 2].item() == 0.0 and matrix.values[0, 0, 0].item() == 1.0
    assert math.isnan(matrix.values[0, 2, 2].item()) and matrix.undefined[0, 2, 2]  # both empty: no IoU, not 1
    assert matrix.undefined[1, 0, 1] and not matrix.undefined[1, 0, 2]
    # Off the diagonal: a has pairs 1/3, 0, 0; b has only the pairs with mask 2 defined (IoU 0) and one undefined.
    assert matrix.layer_means() == pytest.approx({"a": 1 / 9, "b": 0.0})
    assert matrix.undefined_shares() == pytest.approx({"a": 0.0, "b": 1 / 3})
    nothing = iou_matrix([mask(a=bools(0, 0))])
    assert nothing.layer_means() == {"a": None}


def test_methods_compare_at_neuron_level():
    neurons = mask(v=bools(1, 0, 1))
    weights = mask(v=torch.tensor([[0, 1], [0, 0], [0, 0]], dtype=torch.bool))
    assert torch.equal(as_neurons(weights).removed["v"], bools(1, 0, 0))
    between = iou_matrix([neurons], [weights], level="neurons")
    assert not between.symmetric and between.values[0, 0, 0].item() == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="level"):
        iou_matrix([neurons], level="weights")


def test_a_localizer_fits_one_mask_per_embedding(tiny_handle):
    embeddings = encode_prompts(tiny_handle, [m.caption for m in tiny_handle.memorized[:2]]).float()
    localizer = Wanda(sparsity=0.05, record_steps=1, steps=2, cache_dir=None)
    masks = localize_each(localizer, tiny_handle, embeddings, seeds=[0])
    assert len(masks) == 2 and all(m.prompt == "<embedding>" for m in masks)
    # An embedding gives the same mask as the prompt it encodes.
    from_prompt = localizer.fit(tiny_handle, tiny_handle.memorized[0].caption, seeds=[0]).mask_
    assert all(torch.equal(masks[0].removed[name], from_prompt.removed[name]) for name in from_prompt.removed)
    matrix = iou_matrix(masks)
    assert matrix.values.shape == (len(from_prompt.removed), 2, 2)
