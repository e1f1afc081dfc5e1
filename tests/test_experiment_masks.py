"""Saved masks (those the mitigation experiment fits) are named by the weights they were fitted on."""

import torch

from analysis.localize.saved import mask_file
from tiny_model import build_tiny_handle


def test_a_mask_file_belongs_to_one_set_of_weights():
    handle, retrained = build_tiny_handle(seed=0), build_tiny_handle(seed=0)
    path = mask_file(handle, "nemo", 0)
    assert path.name.startswith("nemo-0-") and mask_file(retrained, "nemo", 0) == path
    with torch.no_grad():  # the same model name with other weights, as after retraining
        next(retrained.unet.parameters()).add_(0.01)
    assert mask_file(retrained, "nemo", 0) != path
    assert mask_file(handle, "wanda", 0) != path and mask_file(handle, "nemo", 1) != path
