import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from analysis.metrics import (IMAGENET_MEAN, IMAGENET_STD, SSCD, ReplicationResult, memorization_rate, replication,
                              roc_auc, similarity_matrix, ssim)
from analysis.wen_score import wen_magnitude, wen_score
from analysis.sampling import encode_prompts, initial_noise, noise_generators


def images(n, seed, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_ssim_identity_noise_symmetry():
    x = images(4, 0)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ssim(x, x), torch.ones(4))
    slightly, strongly = ssim(x, x + 0.1 * noise), ssim(x, x + 0.5 * noise)
    assert (slightly < 1).all() and (strongly < slightly).all()
    y = images(4, 2)
    assert torch.equal(ssim(x, y), ssim(y, x))
    assert ssim(x[:1], y).shape == (4,)


def test_ssim_matches_skimage():
    # skimage's Gaussian window is 11x11 at sigma 1.5 (truncate 3.5); compare at that size.
    x, y = images(1, 3), images(1, 4)
    y = 0.6 * x + 0.4 * y
    expected = structural_similarity(x[0].numpy(), y[0].numpy(), channel_axis=0, data_range=2.0,
                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ssim(x, y, window=11).item() == pytest.approx(expected, abs=1e-5)


def test_ssim_rejects_small_images():
    with pytest.raises(ValueError, match="smaller than"):
        ssim(images(1, 0, size=5), images(1, 1, size=5))


def test_similarity_matrix():
    generated, references = images(2, 0), images(3, 1)
    matrix = similarity_matrix(generated, references)
    assert matrix.shape == (2, 3)
    a, b = generated[1].flatten(), references[2].flatten()
    pearson = torch.corrcoef(torch.stack([a, b]))[0, 1]
    torch.testing.assert_close(matrix[1, 2], pearson, atol=1e-5, rtol=0)
    # Brightness and contrast changes leave a copy a copy.
    torch.testing.assert_close(similarity_matrix(0.5 * references + 0.2, references).diagonal(), torch.ones(3))


def test_replication_against_nearest_reference():
    references = images(2, 0)
    noise = torch.randn(references[1].shape, generator=torch.Generator().manual_seed(5))
    generated = torch.stack([references[0], references[1] + 0.05 * noise, images(1, 9)[0]])
    result = replication(generated, references, threshold=0.5)
    assert result.replicated.tolist() == [True, True, False]
    assert result.nearest[:2].tolist() == [0, 1]
    assert result.similarities[0].item() == pytest.approx(1.0, abs=1e-5)
    assert result.rate == pytest.approx(2 / 3)
    single = replication(generated, references[0], threshold=0.5)
    assert single.replicated.tolist() == [True, False, False]
    custom = replication(generated, references, threshold=0.5, similarity=lambda g, r: torch.zeros(len(g), len(r)))
    assert custom.rate == 0.0


def test_memorization_rate_uses_share_of_seeds():
    def result(*flags):
        flags = torch.tensor(flags)
        nearest = torch.zeros(len(flags), dtype=torch.long)
        return ReplicationResult(flags.float(), flags, flags.float().mean().item(), nearest)

    results = [result(True, True), result(True, False), result(False, False)]
    assert memorization_rate(results, min_share=0.5) == pytest.approx(2 / 3)
    assert memorization_rate(results, min_share=1.0) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        memorization_rate(results, min_share=0)


def test_roc_auc_known_values():
    assert roc_auc([3, 4], [1, 2]) == 1.0
    assert roc_auc([1, 2], [3, 4]) == 0.0
    assert roc_auc([1, 1], [1, 1]) == 0.5
    # Pairs: (1,2) lose, (1,0) win, (2,2) tie, (2,0) win, (3,2) win, (3,0) win -> 4.5 / 6.
    assert roc_auc(torch.tensor([1.0, 2.0, 3.0]), np.array([2.0, 0.0])) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        roc_auc([], [1.0])


def test_wen_score(tiny_handle):
    prompts = ["a photo of the red lighthouse", ""]
    scores = wen_score(tiny_handle, prompts, seeds=[0, 1], steps=4, n_score_steps=2)
    assert scores.shape == (2, 2)
    assert (scores[0] > 0).all()
    torch.testing.assert_close(scores[1], torch.zeros(2), rtol=0, atol=1e-5)  # y == y0

    # The first step's score is wen_magnitude at x_T, averaged over seeds.
    scheduler = tiny_handle.scheduler.__class__.from_config(tiny_handle.scheduler.config)
    scheduler.set_timesteps(4)
    x_t = initial_noise(tiny_handle, noise_generators([0, 1]))
    y = encode_prompts(tiny_handle, prompts[:1]).expand(2, -1, -1)
    y0 = encode_prompts(tiny_handle, [""])
    magnitude = wen_magnitude(tiny_handle, x_t, scheduler.timesteps[0], y, y0)
    torch.testing.assert_close(magnitude.mean(), scores[0, 0], rtol=0, atol=1e-5)


def test_wen_magnitude_is_differentiable_in_y(tiny_handle):
    y = encode_prompts(tiny_handle, ["a photo of the red lighthouse"]).clone().requires_grad_(True)
    x_t = initial_noise(tiny_handle, noise_generators([0]))
    wen_magnitude(tiny_handle, x_t, 981, y, encode_prompts(tiny_handle, [""])).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


class MeanColour(torch.nn.Module):
    """Stands in for SSCD: the descriptor is the mean of each channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def test_sscd_plumbing(tmp_path):
    path = tmp_path / "dummy_sscd.pt"
    torch.jit.script(MeanColour()).save(str(path))
    sscd = SSCD(path)
    grey = torch.zeros(1, 3, 32, 32)  # 0 in [-1, 1] is 0.5 in [0, 1]
    expected = (0.5 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(sscd.embed(grey)[0], expected / expected.norm())
    generated, references = images(2, 0), images(3, 1)
    matrix = sscd(generated, references)
    assert matrix.shape == (2, 3)
    torch.testing.assert_close(sscd(generated, generated).diagonal(), torch.ones(2))


def test_sscd_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_sscd.pt"):
        SSCD(tmp_path / "missing_sscd.pt")
