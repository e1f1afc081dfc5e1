import pytest
import torch

from analysis.hooks import nemo_layers
from analysis.localize.nemo import NeMo, initial_selection, max_ssim_with_other_seeds, refine
from analysis.metrics import ms_ssim

PROMPT = "a photo of the red lighthouse"


def bools(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


ACTIVATIONS = {"a": torch.tensor([4.0, 3.0, 2.0, 1.0]), "b": torch.tensor([1.0, 2.0, 3.0])}
NO_OUTLIERS = {"a": torch.zeros(4), "b": torch.zeros(3)}


def test_selection_stops_at_the_first_round_meeting_the_criterion():
    # Each blocked neuron lowers the similarity by 0.2: 4 neurons are needed to reach 0.3, i.e. top-2 per layer.
    def similarity(blocked):
        return 1 - 0.2 * sum(int(b.sum()) for b in blocked.values())

    blocked, reached, trace = initial_selection(ACTIVATIONS, NO_OUTLIERS, similarity, threshold=0.3)
    assert [(r.theta, r.k) for r in trace] == [(5.0, 0), (4.75, 1), (4.5, 2)]
    assert [r.neurons for r in trace][-1] == {"a": 2, "b": 2}
    assert torch.equal(blocked["a"], bools(1, 1, 0, 0)) and torch.equal(blocked["b"], bools(0, 1, 1))
    assert abs(reached - 0.2) < 1e-9


def test_selection_blocks_outliers_and_ends_at_the_theta_floor():
    z_scores = {"a": torch.tensor([0.0, 6.0, 0.0, 1.5]), "b": torch.zeros(3)}
    blocked, reached, trace = initial_selection(ACTIVATIONS, z_scores, lambda blocked: 0.9, threshold=0.5)
    assert trace[0].neurons == {"a": 1, "b": 0}  # z = 6 > θ = 5 from the start
    assert len(trace) == 17 and (trace[-1].theta, trace[-1].k) == (1.0, 16)
    assert blocked["a"].all() and blocked["b"].all() and reached == 0.9


def test_refinement_keeps_only_what_the_criterion_needs():
    calls = []

    def similarity(blocked):  # memorization stops exactly when neuron 2 of layer b is blocked
        calls.append(blocked)
        return 0.0 if blocked["b"][2] else 1.0

    everything = {"a": bools(1, 1, 1, 1), "b": bools(1, 1, 1)}
    blocked, reached = refine(everything, 0.0, similarity, criterion=0.5)
    assert torch.equal(blocked["a"], bools(0, 0, 0, 0)) and torch.equal(blocked["b"], bools(0, 0, 1))
    assert reached == 0.0
    assert len(calls) == 2 + 3  # both layers (b refused, a dropped), then b's three neurons one by one


def test_max_ssim_with_other_seeds():
    base = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    other = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    best = max_ssim_with_other_seeds(torch.cat([base, base, other]))
    assert best[0] == best[1] and abs(best[0] - 1) < 1e-5 and best[2] < 0.5


def count_unet_rows(unet):
    rows = []
    handle = unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    return rows, handle


def test_fit_counts_every_unet_row_and_returns_a_nemo_mask(tiny_handle, tmp_path):
    rows, handle = count_unet_rows(tiny_handle.unet)
    messages = []
    try:
        # τ = -1: every seed counts as memorized and the criterion never holds, so the loop runs from θ = 2 to 1.
        nemo = NeMo(threshold=-1.0, steps=4, step_index=1, theta_start=2.0, scales=2, cache_dir=tmp_path,
                    progress=messages.append)
        mask = nemo.fit(tiny_handle, PROMPT, seeds=[0, 1, 2])
    finally:
        handle.remove()
    assert list(mask.removed) == list(nemo_layers(tiny_handle.unet))
    assert nemo.memorized_seeds_ == [0, 1, 2] and len(nemo.trace_) == 5
    reference_rows = len(tiny_handle.held_out_prompts)
    assert sum(rows) == reference_rows + nemo.unet_evaluations_
    # One message per criterion evaluation, each 2 steps (step_index 1) of 3 seeds.
    assert len(messages) == (nemo.unet_evaluations_ - 1 - 2 * 3) // (2 * 3)
    assert mask.method == "nemo" and mask.parameters["threshold"] == -1.0


def test_fit_blocks_nothing_when_no_seed_looks_memorized(tiny_handle, tmp_path):
    nemo = NeMo(threshold=1.0, steps=4, scales=2, cache_dir=tmp_path)
    mask = nemo.fit(tiny_handle, PROMPT, seeds=[0, 1, 2])
    assert nemo.memorized_seeds_ == [] and nemo.trace_ == [] and nemo.unet_evaluations_ == 1 + 3 * 3
    assert sum(mask.counts().values()) == 0


def test_ms_ssim_is_one_for_identical_maps_and_drops_with_noise():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ms_ssim(x, x), torch.ones(2))
    slightly, strongly = ms_ssim(x, x + 0.1 * noise), ms_ssim(x, x + 0.5 * noise)
    assert (strongly < slightly).all() and (slightly < 1).all()
    assert torch.equal(ms_ssim(x, -x), torch.zeros(2))  # negative structure is clamped to 0, as in NeMo's code
    with pytest.raises(ValueError, match="smaller than"):
        ms_ssim(x[..., :16, :16], x[..., :16, :16])  # 3 scales of 16 px end at 4x4 < the 7x7 window


def test_fit_without_refinement_returns_the_initial_selection(tiny_handle, tmp_path):
    nemo = NeMo(threshold=-1.0, steps=4, step_index=0, theta_start=1.5, scales=2, refine=False, cache_dir=tmp_path)
    mask = nemo.fit(tiny_handle, PROMPT, seeds=[0, 1])
    assert len(nemo.trace_) == 3 and mask.counts() == nemo.trace_[-1].neurons
    assert nemo.unet_evaluations_ == 1 + 2 + 3 * 2  # activations, unblocked δ, one δ per round
    assert mask.parameters["refine"] is False
