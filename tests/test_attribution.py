import pytest
import torch

from analysis.attribution import GradientNorm, IntegratedGradients, memorization_objective, prompt_tokens
from analysis.metrics import wen_score
from analysis.sampling import encode_prompts

PROMPT = "a photo of the red lighthouse"


def test_pieces_map_back_to_words(tiny_handle):
    pieces, words, word_of_piece = prompt_tokens(tiny_handle, PROMPT)
    assert words == PROMPT.split()
    assert len(word_of_piece) == len(pieces)
    assert "".join(p.removesuffix("</w>") for p in pieces) == PROMPT.replace(" ", "")


def test_objective_is_wen_score(tiny_handle):
    seeds = [0, 1]
    objective = memorization_objective(tiny_handle, seeds)
    expected = wen_score(tiny_handle, [PROMPT], seeds=seeds, steps=tiny_handle.default_steps)[0, 0]
    torch.testing.assert_close(objective(encode_prompts(tiny_handle, [PROMPT]))[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", [GradientNorm(seeds=[0, 1]), IntegratedGradients(seeds=[0, 1], n_steps=8)])
def test_scores_one_per_token_and_word(tiny_handle, method):
    result = method.attribute(tiny_handle, PROMPT)
    assert result.token_scores.shape == (len(result.tokens),)
    assert result.words == PROMPT.split()
    assert sum(result.word_scores) == pytest.approx(result.token_scores.sum().item(), rel=1e-5)
    assert torch.isfinite(result.token_scores).all()


def test_gradient_norm_is_non_negative(tiny_handle):
    assert (GradientNorm(seeds=[0]).attribute(tiny_handle, PROMPT).token_scores >= 0).all()


def test_integrated_gradients_completeness(tiny_handle):
    """Attributions over all positions add up to m(y) − m(y0) = m(y); captum's delta measures the gap."""
    result = IntegratedGradients(seeds=[0, 1], n_steps=16).attribute(tiny_handle, PROMPT)
    assert result.convergence_delta < 1e-2 * result.score


def test_empty_prompt_is_rejected(tiny_handle):
    with pytest.raises(ValueError, match="no tokens"):
        GradientNorm().attribute(tiny_handle, "")
