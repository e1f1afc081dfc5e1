import dataclasses

import pytest
import torch

from analysis.hooks import nemo_layers
from analysis.localize import nemo
from analysis.localize.nemo import SD14_THRESHOLD, NeMo, resolve_settings, sd14_statistics
from analysis.localize.nemo_delta import DeltaReading, DeltaSimilarity, noise_differences
from analysis.localize.nemo_selection import initial_selection, refine, selected_neurons, selection_rounds
from analysis.metrics import ms_ssim
from tiny_model import HELD_OUT_PROMPTS

PROMPT = "a photo of the red lighthouse"
WINDOW = 7


def bools(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


ACTIVATIONS = {"a": torch.tensor([4.0, 3.0, 2.0, 1.0]), "b": torch.tensor([1.0, 2.0, 3.0])}
NO_OUTLIERS = {"a": torch.zeros(4), "b": torch.zeros(3)}


def test_selection_stops_at_the_first_round_meeting_the_criterion():
    # Each blocked neuron lowers the similarity by 0.2: 4 neurons are needed to reach 0.3, i.e. top-2 per layer.
    def similarity(blocked):
        return 1 - 0.2 * sum(map(len, blocked.values()))

    blocked, reached, trace = initial_selection(ACTIVATIONS, NO_OUTLIERS, similarity, threshold=0.3)
    assert [(r.theta, r.k) for r in trace] == [(5.0, 0), (4.75, 1), (4.5, 2)]
    assert trace[-1].neurons == {"a": 2, "b": 2}
    assert blocked == {"a": [0, 1], "b": [2, 1]}  # top-k from the most active down
    assert abs(reached - 0.2) < 1e-9


def test_selection_runs_16_rounds_and_ends_after_theta_1_25_as_the_authors_loop_does():
    # The authors' loop lowers θ after a round above τ and stops when θ reaches 1, before evaluating θ = 1.
    assert len(selection_rounds()) == 16 and selection_rounds()[-1] == 1.25
    z_scores = {"a": torch.tensor([0.0, 6.0, 0.0, 1.5]), "b": torch.tensor([0.0, 1.2, 0.0])}
    blocked, reached, trace = initial_selection(ACTIVATIONS, z_scores, lambda blocked: 0.9, threshold=0.5)
    assert trace[0].neurons == {"a": 1, "b": 0}  # z = 6 > θ = 5 from the start
    assert len(trace) == 16 and (trace[-1].theta, trace[-1].k) == (1.25, 15)
    assert all(r.theta > 1.0 for r in trace)
    assert sorted(blocked["a"]) == [0, 1, 2, 3] and sorted(blocked["b"]) == [0, 1, 2] and reached == 0.9
    # θ_min itself is never a round; a start at the floor still runs one round.
    assert selection_rounds(2.0, 0.25, 1.0) == [2.0, 1.75, 1.5, 1.25] and selection_rounds(1.0, 0.25, 1.0) == [1.0]


def test_selected_neurons_follow_the_authors_list_order():
    activations = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2])
    z_scores = torch.tensor([3.0, 0.0, 4.0, 2.5, 0.0])
    # Outliers (z > 2) by index, then the top 2 by activation from the most active down; neuron 3 is both and is
    # listed at its top-k place.
    assert selected_neurons(activations, z_scores, theta=2.0, k=2) == [0, 2, 1, 3]
    assert selected_neurons(activations, z_scores, theta=5.0, k=0) == []


def test_refinement_visits_layers_last_first_then_neurons_in_list_order():
    visits = []

    def similarity(blocked):
        visits.append({name: list(neurons) for name, neurons in blocked.items()})
        return 0.0 if 2 in blocked["b"] else 1.0  # memorization stops exactly when neuron 2 of layer b is blocked

    everything = {"a": [3, 1, 0, 2], "b": [0, 2, 1]}
    blocked, reached = refine(everything, 0.0, similarity, criterion=0.5)
    assert blocked == {"a": [], "b": [2]} and reached == 0.0
    assert visits == [
        {"a": [3, 1, 0, 2], "b": []},  # layer b first (last layer): refused
        {"a": [], "b": [0, 2, 1]},  # layer a: dropped
        {"a": [], "b": [2, 1]}, {"a": [], "b": [1]}, {"a": [], "b": [2]},  # b's neurons in its list order
    ]


def test_refinement_keeps_a_change_only_strictly_below_the_criterion():
    # Every trial lands exactly on the criterion: the authors' `<` keeps none of them.
    blocked, reached = refine({"a": [0, 1], "b": [2]}, 0.4, lambda blocked: 0.4, criterion=0.4)
    assert blocked == {"a": [0, 1], "b": [2]} and reached == 0.4
    blocked, _ = refine({"a": [0, 1], "b": [2]}, 0.4, lambda blocked: 0.4 - 1e-6, criterion=0.4)
    assert blocked == {"a": [], "b": []}


def test_delta_is_min_max_normalised_to_0_1_per_image_and_channel(tiny_handle):
    for reading in (DeltaReading(4, 1, advance_latents=False), DeltaReading(4, 2, advance_latents=True)):
        deltas = noise_differences(tiny_handle, [PROMPT, "a green ring on a black background"], [0, 1, 2], reading)
        assert deltas.shape == (6, 3, 16, 16) and deltas.dtype == torch.float32
        torch.testing.assert_close(deltas.amin(dim=(2, 3)), torch.zeros(6, 3))
        torch.testing.assert_close(deltas.amax(dim=(2, 3)), torch.ones(6, 3))


def test_authors_reading_feeds_x_T_at_the_timestep_without_stepping(tiny_handle):
    # δ = ε(x_T, t_1, y) − x_T, computed here by hand from the model's pieces.
    from analysis.sampling import ddim_schedule, encode_prompts, initial_noise, noise_generators

    x = initial_noise(tiny_handle, noise_generators([0, 1]))
    t = ddim_schedule(tiny_handle, 4).timesteps[1]
    with torch.no_grad():
        epsilon = tiny_handle.unet(x, t, encoder_hidden_states=encode_prompts(tiny_handle, [PROMPT]).expand(2, -1, -1)
                                   ).sample
    delta = epsilon - x
    low, high = delta.amin(dim=(2, 3), keepdim=True), delta.amax(dim=(2, 3), keepdim=True)
    expected = (delta - low) / (high - low)
    torch.testing.assert_close(noise_differences(tiny_handle, [PROMPT], [0, 1], DeltaReading(4, 1, False)), expected)


def test_the_project_s_delta_similarity_uses_data_range_1():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 32, 32, generator=generator), torch.rand(3, 3, 32, 32, generator=generator)
    similarity = DeltaSimilarity(WINDOW)
    torch.testing.assert_close(similarity(a, b), ms_ssim(a, b, 3, WINDOW, data_range=1.0))
    # The luminance term depends on the data range: a range of 2 scores the same pair higher.
    assert (ms_ssim(a, b, 3, WINDOW, data_range=2.0) > similarity(a, b)).all()


def test_max_ssim_with_other_seeds():
    base = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    other = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    best = DeltaSimilarity(WINDOW).max_with_other_seeds(torch.cat([base, base, other]))
    assert best[0] == best[1] and abs(best[0] - 1) < 1e-5 and best[2] < 0.5


def test_settings_follow_the_model_and_explicit_values_win(tiny_handle):
    assert resolve_settings(tiny_handle, "auto")["name"] == "pixel"  # the tiny model is pixel-space
    authors = resolve_settings(tiny_handle, "authors", window=5, scales=2, step_index=3)
    assert authors == dict(nemo.SETTINGS["authors"], window=5, scales=2, step_index=3, name="authors", fitted=None)
    authors = nemo.SETTINGS["authors"]
    assert authors["window"] == 11 and authors["advance_latents"] is False and authors["threshold_guidance"] == 7.0
    with pytest.raises(ValueError, match="unknown NeMo settings"):
        resolve_settings(tiny_handle, "paper")


def test_sd14_statistics_are_the_authors_seven_value_layers():
    sizes = [320, 320, 640, 640, 1280, 1280, 1280]
    names = [f"down.{b}.attn.{a}.to_v" for b in range(3) for a in range(2)] + ["mid.attn.0.to_v"]
    layers = {name: torch.nn.Linear(768, size) for name, size in zip(names, sizes)}
    stats = sd14_statistics(layers)
    assert list(stats) == names and all(mean.shape == (size,) and (std > 0).all()
                                        for (mean, std), size in zip(stats.values(), sizes))
    with pytest.raises(ValueError, match="pass reference_prompts"):
        sd14_statistics({"down.0.attn.0.to_v": torch.nn.Linear(32, 16)})
    assert SD14_THRESHOLD == 0.428


def test_sd14_with_the_authors_settings_and_no_reference_prompts_uses_the_authors_reference(tiny_handle, monkeypatch):
    sd14 = dataclasses.replace(tiny_handle, name="CompVis/stable-diffusion-v1-4", held_out_prompts=[])
    with pytest.raises(ValueError, match="pass reference_prompts"):  # the tiny UNet's layers are not SD v1.4's
        NeMo(settings="authors", window=WINDOW, steps=4, scales=2, cache_dir=None).fit(sd14, PROMPT, seeds=[0, 1])
    # With statistics that fit this UNet in their place: the authors' τ, no calibration.
    zeros = {name: (torch.zeros(layer.out_features), torch.ones(layer.out_features))
             for name, layer in nemo_layers(tiny_handle.unet).items()}
    monkeypatch.setattr(nemo, "sd14_statistics", lambda layers: zeros)
    model = NeMo(settings="authors", window=WINDOW, steps=4, scales=2, refine=False, cache_dir=None).fit(
        sd14, PROMPT, seeds=[0, 1])
    assert model.threshold_ == SD14_THRESHOLD and model.settings_["reference"] == "the authors' SD v1.4 statistics"
    # Reference prompts given: computed from them and τ recalibrated.
    model = NeMo(reference_prompts=HELD_OUT_PROMPTS, settings="authors", window=WINDOW, steps=4, scales=2,
                 refine=False, cache_dir=None).fit(sd14, PROMPT, seeds=[0, 1])
    assert model.threshold_ != SD14_THRESHOLD and model.settings_["reference"] == "2 reference prompts"


def count_unet_rows(unet):
    rows = []
    handle = unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    return rows, handle


def test_fit_counts_every_unet_row_and_reports_every_criterion_evaluation(tiny_handle, tmp_path):
    rows, handle = count_unet_rows(tiny_handle.unet)
    events = []
    try:
        # τ = -1: every seed counts as memorized and the criterion never holds, so the loop runs its 4 rounds.
        model = NeMo(threshold=-1.0, steps=4, step_index=1, theta_start=2.0, scales=2, cache_dir=tmp_path)
        assert model.fit(tiny_handle, PROMPT, seeds=[0, 1, 2], callback=events.append) is model
    finally:
        handle.remove()
    assert list(model.mask_.removed) == list(nemo_layers(tiny_handle.unet))
    assert model.memorized_seeds_ == [0, 1, 2] and len(model.trace_) == 4
    assert sum(rows) == len(tiny_handle.held_out_prompts) + model.unet_evaluations_
    # One event per criterion evaluation, each 2 steps (step_index 1, latents advanced) of 3 seeds.
    assert len(events) == (model.unet_evaluations_ - 1 - 2 * 3) // (2 * 3)
    assert [e.stage for e in events[:4]] == ["NeMo initial selection"] * 4 and events[3].total == 4
    assert model.mask_.method == "nemo" and model.mask_.parameters["threshold"] == -1.0


def test_fit_blocks_nothing_when_no_seed_looks_memorized(tiny_handle, tmp_path):
    model = NeMo(threshold=1.0, steps=4, scales=2, cache_dir=tmp_path).fit(tiny_handle, PROMPT, seeds=[0, 1, 2])
    # Pixel settings: δ read after 2 steps, 3 steps of 3 seeds.
    assert model.memorized_seeds_ == [] and model.trace_ == [] and model.unet_evaluations_ == 1 + 3 * 3
    assert sum(model.mask_.counts().values()) == 0


def test_ms_ssim_is_one_for_identical_maps_and_drops_with_noise():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ms_ssim(x, x), torch.ones(2))
    slightly, strongly = ms_ssim(x, x + 0.1 * noise), ms_ssim(x, x + 0.5 * noise)
    assert (strongly < slightly).all() and (slightly < 1).all()
    assert torch.equal(ms_ssim(x, -x), torch.zeros(2))  # negative structure is clamped to 0, as in NeMo's code
    with pytest.raises(ValueError, match="smaller than"):
        ms_ssim(x[..., :16, :16], x[..., :16, :16])  # 3 scales of 16 px end at 4x4 < the 7x7 window


def test_the_authors_window_on_a_small_model_is_a_clear_error(tiny_handle, tmp_path):
    with pytest.raises(ValueError, match="smaller than the 11x11 SSIM window"):
        NeMo(settings="authors", threshold=0.5, steps=4, scales=2, cache_dir=tmp_path).fit(tiny_handle, PROMPT)


def test_fit_without_refinement_returns_the_initial_selection(tiny_handle, tmp_path):
    model = NeMo(threshold=-1.0, settings="authors", window=7, steps=4, theta_start=1.5, scales=2, refine=False,
                 cache_dir=tmp_path).fit(tiny_handle, PROMPT, seeds=[0, 1])
    assert len(model.trace_) == 2 and model.mask_.counts() == model.trace_[-1].neurons
    # The authors' reading: one UNet row per seed (x_T fed at step 1, never stepped).
    assert model.unet_evaluations_ == 1 + 2 + 2 * 2  # activations, unblocked δ, one δ per round
    assert model.mask_.parameters["refine"] is False and model.mask_.parameters["settings"]["name"] == "authors"


def test_a_neuron_both_outlier_and_top_k_is_never_tested_by_the_authors_refinement_when_the_rounds_ran_out():
    # Neuron 1 is an outlier in every round (z = 6) and, from k = 2 on, a top-k pick too. Blocking all four keeps
    # the similarity at 0.9 > τ in every round, so the 16 rounds run out and refinement's threshold is 0.9.
    # Unblocking neuron 1 alone would bring it to 0.8; unblocking any other neuron (or the layer) to 1.
    activations, z_scores = {"a": torch.tensor([4.0, 3.0, 2.0, 1.0])}, {"a": torch.tensor([0.0, 6.0, 0.0, 0.0])}

    def similarity(blocked):
        evaluated.append(sorted(set(blocked["a"])))
        if not {0, 2, 3} <= set(blocked["a"]):
            return 1.0
        return 0.9 if 1 in blocked["a"] else 0.8

    results = {}
    for duplicates in (True, False):
        evaluated = []
        blocked, reached, trace = initial_selection(activations, z_scores, similarity, threshold=0.5,
                                                    duplicates=duplicates)
        assert len(trace) == 16 and reached == 0.9 and trace[-1].neurons == {"a": 4}
        rounds = len(evaluated)
        results[duplicates] = blocked, *refine(blocked, reached, similarity, max(0.5, reached)), evaluated[rounds:]
    # The authors' list holds neuron 1 twice: as an outlier first, then at its top-k place. Each visit removes one
    # copy; with the other copy left the mask is unchanged and scores 0.9, not below 0.9: the neuron stays, untested,
    # and neither visit costs a UNet evaluation.
    listed, refined, reached, evaluated = results[True]
    assert listed == {"a": [1, 0, 1, 2, 3]}
    assert sorted(set(refined["a"])) == [0, 1, 2, 3] and reached == 0.9
    assert evaluated == [[], [1, 2, 3], [0, 1, 3], [0, 1, 2]]  # the layer, then neurons 0, 2, 3
    # The project's list holds it once, at its top-k place, and tests it: unblocked at 0.8.
    listed, refined, reached, evaluated = results[False]
    assert listed == {"a": [0, 1, 2, 3]}
    assert refined == {"a": [0, 2, 3]} and reached == 0.8
    assert evaluated == [[], [1, 2, 3], [0, 2, 3], [0, 3], [0, 2]]  # the layer, then neurons 0, 1, 2, 3


def test_a_listed_twice_neuron_is_tested_at_its_second_copy_when_the_similarity_is_already_below():
    # Below the threshold from the start: the first copy's visit drops that copy without a UNet call, and the
    # visit of the second copy tests the neuron.
    evaluated = []

    def similarity(blocked):
        evaluated.append(list(blocked["a"]))
        return 0.2 if 0 in blocked["a"] else 0.6

    refined, reached = refine({"a": [1, 0, 1]}, 0.2, similarity, criterion=0.4)
    assert refined == {"a": [0]} and reached == 0.2
    assert evaluated == [[], [1], [0]]  # the layer, neuron 0, then neuron 1's second copy


def test_the_authors_ms_ssim_is_torchmetrics_as_they_call_it():
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    def min_max(x):
        low, high = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
        return (x - low) / (high - low)

    authors, project = DeltaSimilarity(11, 3, "torchmetrics"), DeltaSimilarity(11, 3, "range1")
    generator = torch.Generator().manual_seed(0)
    for pairs in (1, 3, 10):
        # Random δ pairs of SD's 64x64 latents, normalised as NeMo does, sharing some structure.
        shared = torch.randn(pairs, 4, 64, 64, generator=generator)
        a = min_max(shared + torch.randn(pairs, 4, 64, 64, generator=generator))
        b = min_max(shared + 2 * torch.randn(pairs, 4, 64, 64, generator=generator))
        expected = multiscale_structural_similarity_index_measure(a, b, reduction="none", kernel_size=11,
                                                                 betas=(0.33, 0.33, 0.33))
        torch.testing.assert_close(authors(a, b), expected, rtol=0, atol=1e-5)
        # Data range 1 at every scale is not what their call computes.
        assert (project(a, b) - expected).abs().max() > 1e-4
