import numpy as np
import pytest
import torch

from analysis.dispersion import dispersion, pairwise_l2, reference_sets


def test_pairwise_distances_of_hand_made_embeddings():
    # Three embeddings [2 tokens, 2]: 0, a 3-4-0-0 vector (distance 5) and its double (10 from 0, 5 from it).
    embeddings = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[3.0, 4.0], [0.0, 0.0]], [[6.0, 8.0], [0.0, 0.0]]])
    assert np.allclose(pairwise_l2(embeddings), [5.0, 10.0, 5.0])
    assert np.allclose(pairwise_l2(embeddings, tokens=[1]), 0.0)
    summary = dispersion({"line": embeddings})["line"]
    assert summary.size == 3 and summary.mean == pytest.approx(20 / 3) and summary.median == 5.0
    assert summary.min == 5.0 and summary.max == 10.0 and set(summary.as_dict()) >= {"mean", "std"}
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_l2(embeddings[:1])


def test_reference_sets_of_the_tiny_model(tiny_handle):
    sets = reference_sets(tiny_handle, n_random=5)
    assert sets["memorized prompts"].shape == (len(tiny_handle.memorized), 77, 32)
    assert sets["held-out prompts"].shape[0] == len(tiny_handle.held_out_prompts)
    assert sets["random"].shape == (5, 77, 32) and sets["random"].dtype == torch.float32
    # Random embeddings of the size of real ones lie farther apart than prompts that share words and padding.
    summaries = dispersion(sets)
    assert summaries["random"].mean > summaries["memorized prompts"].mean
