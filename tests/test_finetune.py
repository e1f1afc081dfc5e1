"""Adversarial fine-tuning on the tiny random model: a round runs, checkpoints, resumes, loads back, cancels."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from analysis import finetune
from analysis.dori import DoriSearch
from analysis.finetune import CHECKPOINT_FILE, AdversarialFineTuning, FineTuneProgress, trainable_parameters
from analysis.finetune import surrogate, training  # modules whose names the monkeypatches replace
from analysis.hooks import nemo_layers
from analysis.model import load_model
from analysis.sampling import SamplingCancelled, encode_prompts
from tiny_model import MEMORIZED_CAPTIONS


@pytest.fixture(scope="module")
def handle(tiny_handle):
    # Few sampling steps keep the surrogate and evaluation generations quick.
    return dataclasses.replace(tiny_handle, default_steps=3, default_guidance=3.0)


def tiny_finetuning(**overrides) -> AdversarialFineTuning:
    settings = dict(rounds=1, triggers_per_image=2, steps_per_round=2, dori=DoriSearch(steps=2, batch_size=2),
                    lr=1e-3, normal_batch=2, adversarial_batch=2, surrogate_seeds=2, eval_starts=1, eval_seeds=2)
    return AdversarialFineTuning(**{**settings, **overrides})


def stages(events: list[FineTuneProgress]) -> set[tuple[int, str]]:
    return {(event.round, event.stage) for event in events}


def test_a_round_checkpoints_resumes_and_loads_back(handle, tmp_path):
    before = {name: p.clone() for name, p in handle.unet.named_parameters()}
    events: list[FineTuneProgress] = []
    result = tiny_finetuning().fit(handle, [0], tmp_path, callback=events.append)

    assert {(0, "surrogate"), (0, "triggers"), (0, "train"), (0, "evaluate"), (0, "finished")} <= stages(events)
    assert (tmp_path / CHECKPOINT_FILE).is_file()
    assert len(result.history) == 1
    # The finished round is reported with its history record, after its last step.
    assert events[-1].stage == "finished" and events[-1].record == result.history[0]
    record = result.history[0]
    assert len(record["normal_loss"]) == len(record["adversarial_loss"]) == 2
    assert set(record["targets"][0]) >= {"prompt_replication", "dori_replication"}
    assert "whole layer" in result.surrogate_sources[handle.memorized[0].caption]
    # The caller's model is untouched; the saved one is the fine-tuned one.
    assert all(torch.equal(p, before[name]) for name, p in handle.unet.named_parameters())
    loaded = load_model(result.model_dir)
    assert [m.caption for m in loaded.memorized] == [m.caption for m in handle.memorized]
    assert loaded.default_steps == handle.default_steps
    assert any(not torch.equal(p, before[name]) for name, p in loaded.unet.named_parameters())
    sidecar = json.loads((result.model_dir / "memorized.json").read_text())
    assert sidecar["adversarial_finetuning"]["targets"] == [handle.memorized[0].caption]

    # Same settings again: the finished round is skipped, nothing is recomputed.
    events.clear()
    again = tiny_finetuning().fit(handle, [0], tmp_path, callback=events.append)
    assert events == [] and again.history == result.history
    # One more round continues from the checkpoint.
    more = tiny_finetuning(rounds=2).fit(handle, [0], tmp_path, callback=events.append)
    assert len(more.history) == 2 and more.history[0] == result.history[0]
    assert {event.round for event in events} == {1}


def test_resume_refuses_other_settings(handle, tmp_path):
    tiny_finetuning(eval_starts=0).fit(handle, [0], tmp_path)
    with pytest.raises(ValueError, match="other parameters"):
        tiny_finetuning(eval_starts=0, lr=1e-2).fit(handle, [0], tmp_path)


def test_cancellation_stops_without_a_checkpoint(handle, tmp_path):
    def cancel_in_training(progress: FineTuneProgress) -> None:
        if progress.stage == "train":
            raise SamplingCancelled

    before = {name: p.clone() for name, p in handle.unet.named_parameters()}
    with pytest.raises(SamplingCancelled):
        tiny_finetuning().fit(handle, [1], tmp_path, callback=cancel_in_training)
    assert not (tmp_path / CHECKPOINT_FILE).exists()
    assert all(torch.equal(p, before[name]) for name, p in handle.unet.named_parameters())
    assert not any(p.requires_grad for p in handle.unet.parameters())


@pytest.mark.parametrize("targets, message", [([], "no targets"), ([2], "does not exist"), (["a dog"], "not the caption"),
                                              ([0, MEMORIZED_CAPTIONS[0]], "same image")])
def test_bad_targets_are_refused(handle, tmp_path, targets, message):
    with pytest.raises(ValueError, match=message):
        tiny_finetuning().fit(handle, targets, tmp_path)


def test_a_replicating_surrogate_is_refused(handle, tmp_path):
    image = handle.memorized[0].image
    with pytest.raises(ValueError, match="still replicates"):
        tiny_finetuning(surrogate=image).fit(handle, [0], tmp_path)


def test_bad_settings_are_refused(handle, tmp_path):
    with pytest.raises(ValueError, match="optimizer"):
        tiny_finetuning(optimizer="lbfgs").fit(handle, [0], tmp_path)
    with pytest.raises(ValueError, match="rounds"):
        tiny_finetuning(rounds=0).fit(handle, [0], tmp_path)
    with pytest.raises(ValueError, match="nothing to train on"):
        tiny_finetuning(normal_batch=0, adversarial_batch=0).fit(handle, [0], tmp_path)
    with pytest.raises(ValueError, match="adversarial_batch"):
        tiny_finetuning(adversarial_batch=-1).fit(handle, [0], tmp_path)
    with pytest.raises(ValueError, match="ema_decay"):
        tiny_finetuning(ema_decay=1.0).fit(handle, [0], tmp_path)
    with pytest.raises(ValueError, match="utility_loss"):
        tiny_finetuning(utility_loss="l1").fit(handle, [0], tmp_path)
    with pytest.raises(ValueError, match="float32"):
        tiny_finetuning().fit(dataclasses.replace(handle, dtype=torch.float16), [0], tmp_path)


def test_trainable_selection(handle):
    cross_attention = trainable_parameters(handle.unet, "attn2")
    assert cross_attention and all(".attn2." in name for name in cross_attention)
    assert len(trainable_parameters(handle.unet, "all")) == len(list(handle.unet.parameters()))
    assert all(name.startswith("mid_block") for name in trainable_parameters(handle.unet, ["mid_block."]))
    with pytest.raises(ValueError, match="match no UNet parameter"):
        trainable_parameters(handle.unet, ["decoder."])
    with pytest.raises(ValueError, match="unknown trainable preset"):
        trainable_parameters(handle.unet, "conv")


def test_params_are_json():
    params = tiny_finetuning(surrogate=torch.zeros(3, 16, 16)).get_params()
    assert json.loads(json.dumps(params))["dori"]["steps"] == 2
    assert params["surrogate"] == "image [3, 16, 16]"
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        AdversarialFineTuning.from_params(params)
    rebuilt = AdversarialFineTuning.from_params(json.loads(json.dumps(tiny_finetuning().get_params())))
    assert rebuilt == tiny_finetuning()
    with pytest.raises(ValueError, match="unknown"):
        AdversarialFineTuning.from_params({"epochs": 3})


def test_the_mitigated_surrogate_blocks_every_value_layer_when_no_single_layer_stops_replication(handle, monkeypatch):
    item = handle.memorized[0]
    blocked = []

    def fake_generate(handle, prompts, seeds, mask=None, callback=None):
        blocked.append(mask.method)
        # Every single-layer mask leaves the image; only blocking every value layer removes it.
        image = torch.zeros_like(item.image) if mask.method == "every value layer" else item.image
        return image.expand(len(seeds), *item.image.shape).clone()

    monkeypatch.setattr(surrogate, "generate", fake_generate)
    images, source = finetune.mitigated_surrogate(handle, item, "mitigated", seeds=[0, 1])
    assert source.startswith("every cross-attention value layer blocked")
    assert blocked.count("whole layer") == len(nemo_layers(handle.unet)) and blocked[-1] == "every value layer"
    assert torch.equal(images, torch.zeros(2, *item.image.shape))


def test_the_denoising_loss_draws_noise_with_the_models_training_offset(handle, monkeypatch):
    """A model trained with offset noise is fine-tuned with it: the noise per image and channel gets a shared shift."""
    images = torch.zeros(64, *handle.latent_shape)
    text = torch.zeros(64, 77, handle.text_encoder.config.hidden_size)
    drawn = []
    monkeypatch.setattr(training, "predict_noise", lambda unet, x, t, y: (drawn.append(x) or torch.zeros_like(x), None))
    no_noise_schedule = lambda z0, noise, t: noise  # noqa: E731: x_t is the noise itself
    monkeypatch.setattr(handle.scheduler, "add_noise", no_noise_schedule)
    for offset in (0.0, 1.0):
        finetune.denoising_loss(dataclasses.replace(handle, training_offset_noise=offset), handle.unet, images, text,
                                torch.Generator().manual_seed(0))
    plain, offset = (x.mean(dim=(2, 3)).std().item() for x in drawn)
    # Per-(image, channel) means: ≈ 1/side of plain noise, ≈ 1 with an offset of std 1.
    assert plain < 0.3 < 0.7 < offset


def test_the_training_offset_travels_with_a_saved_model(handle, tmp_path):
    finetune.save_model_folder(dataclasses.replace(handle, training_offset_noise=0.1), tmp_path / "model")
    assert load_model(tmp_path / "model").training_offset_noise == 0.1


def test_the_control_without_a_trigger_term_trains_on_normal_pairs_only(handle, tmp_path):
    events: list[FineTuneProgress] = []
    result = tiny_finetuning(adversarial_batch=0).fit(handle, [0], tmp_path, callback=events.append)
    # No surrogate, no trigger search.
    assert {stage for _, stage in stages(events)} == {"train", "evaluate", "finished"}
    assert result.surrogate_sources == {}
    record = result.history[0]
    assert record["adversarial_loss"] == [0.0, 0.0] and all(loss > 0 for loss in record["normal_loss"])
    assert load_model(result.model_dir).memorized[0].caption == handle.memorized[0].caption


def test_distillation_holds_the_unet_to_its_teacher(handle):
    """The distilled normal term is zero for the teacher itself and positive once the UNet moves away from it."""
    images = handle.memorized[0].image[None].expand(4, -1, -1, -1)
    text = encode_prompts(handle, [handle.memorized[0].caption] * 4)
    moved = copy.deepcopy(handle.unet)
    with torch.no_grad():
        next(moved.parameters()).add_(0.1)

    def loss(unet, teacher):
        return finetune.denoising_loss(handle, unet, images, text, torch.Generator().manual_seed(0), teacher)

    assert loss(handle.unet, handle.unet).item() == 0.0
    assert loss(moved, handle.unet).item() > 0.0
    # Toward the noise instead, the loss of the same UNet is the usual positive L_DM.
    assert loss(handle.unet, None).item() > 0.0


def test_distillation_fine_tuning_runs_a_round(handle, tmp_path):
    result = tiny_finetuning(utility_loss="distillation").fit(handle, [0], tmp_path)
    record = result.history[0]
    assert len(record["normal_loss"]) == 2 and all(loss >= 0 for loss in record["normal_loss"])
    # The first step starts from the teacher's own weights: nothing to distil yet.
    assert record["normal_loss"][0] == 0.0
    assert result.params["utility_loss"] == "distillation"


def test_with_ema_decay_the_moving_average_is_saved_and_resumes(handle, tmp_path):
    """One step of d = 0.9: the saved model is 0.9 × the start + 0.1 × the raw weights; a resumed run equals a straight one."""
    before = {name: p.clone() for name, p in handle.unet.named_parameters()}
    settings = dict(ema_decay=0.9, steps_per_round=1, eval_starts=0)
    result = tiny_finetuning(**settings).fit(handle, [0], tmp_path / "resumed")
    raw = torch.load(tmp_path / "resumed" / CHECKPOINT_FILE, weights_only=True)["unet"]
    saved = dict(load_model(result.model_dir).unet.named_parameters())
    assert any(not torch.equal(raw[name], before[name]) for name in raw)
    for name, weights in raw.items():
        torch.testing.assert_close(saved[name], 0.9 * before[name] + 0.1 * weights)

    resumed = tiny_finetuning(**settings, rounds=2).fit(handle, [0], tmp_path / "resumed")
    straight = tiny_finetuning(**settings, rounds=2).fit(handle, [0], tmp_path / "straight")
    resumed_unet = dict(load_model(resumed.model_dir).unet.named_parameters())
    for name, weights in load_model(straight.model_dir).unet.named_parameters():
        torch.testing.assert_close(resumed_unet[name], weights)


def test_side_effects_compare_the_non_selected_images_and_held_out_prompts(handle):
    unchanged = finetune.side_effects(handle, handle, [0], seeds=[0, 1])
    assert [row["caption"] for row in unchanged["others"]] == MEMORIZED_CAPTIONS[1:]  # the target is left out
    assert all(row["before"] == row["after"] for row in unchanged["others"])
    assert [row["prompt"] for row in unchanged["held_out"]] == handle.held_out_prompts[:finetune.SIDE_EFFECT_PROMPTS]
    assert all(row["similarity"] == pytest.approx(1.0) and row["before"].shape[0] == 2 for row in unchanged["held_out"])

    tuned = dataclasses.replace(handle, unet=copy.deepcopy(handle.unet))
    with torch.no_grad():
        for parameter in tuned.unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    changed = finetune.side_effects(handle, tuned, [0], seeds=[0, 1])
    assert all(row["similarity"] < 0.999 for row in changed["held_out"])
    assert torch.equal(changed["held_out"][0]["before"], unchanged["held_out"][0]["before"])  # the base is left alone


def test_mixed_precision_and_checkpointing_train_float32_weights(handle, tmp_path):
    """bfloat16 autocast on the CPU stands in for the GPU's mixed precision: weights and Adam's state stay float32,
    the losses are finite and the UNet's checkpointing is off again afterwards."""
    result = tiny_finetuning(mixed_precision=True, gradient_checkpointing=True).fit(handle, [0], tmp_path)
    record = result.history[0]
    assert all(torch.isfinite(torch.tensor(record["normal_loss"] + record["adversarial_loss"])))
    tuned = load_model(result.model_dir)
    assert all(p.dtype == torch.float32 for p in tuned.unet.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(tuned.unet.parameters(), handle.unet.parameters()))
    checkpoint = torch.load(tmp_path / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    assert all(value.dtype == torch.float32 for state in checkpoint["optimizer"]["state"].values()
               for key, value in state.items() if key != "step")
    assert not handle.unet.is_gradient_checkpointing
