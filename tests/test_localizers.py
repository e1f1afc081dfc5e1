"""What every localizer and every analysis that hooks the UNet promise: one contract, and a clean model afterwards."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch

from analysis.cli import main
from analysis.discrepancy import activation_discrepancy
from analysis.localize import Localizer, wanda
from analysis.localize.nemo import NeMo
from analysis.localize.wanda import Wanda
from analysis.progress import TaskProgress
from analysis.sampling import DenoisingStep, SamplingCancelled, encode_prompts, sample
from analysis.tasks import run_task
from tiny_model import HELD_OUT_PROMPTS, build_tiny_handle

PROMPT = "a photo of the red lighthouse"
REFERENCES = ["a small red circle on a white background", "a large blue square on a black background"]
# Small settings for the tiny model: NeMo with a fixed τ that every seed exceeds (no calibration), two rounds.
LOCALIZERS = {
    "nemo": lambda references: NeMo(reference_prompts=references, threshold=-1.0, steps=4, theta_start=1.5, scales=2,
                                    refine=False, cache_dir=None),
    "wanda": lambda references: Wanda(reference_prompts=references, sparsity=0.05, steps=4, record_steps=2,
                                      cache_dir=None),
}


@pytest.fixture(scope="module")
def handle():
    """A model of this module's own, so that a hook left behind shows here and nowhere else."""
    return build_tiny_handle(seed=3)


@pytest.mark.parametrize("method", sorted(LOCALIZERS))
def test_localizers_share_one_contract(handle, method):
    localizer: Localizer = LOCALIZERS[method](REFERENCES)
    assert localizer.reference_prompts == REFERENCES  # a hyperparameter, set in __init__
    events = []
    fitted = localizer.fit(handle, PROMPT, seeds=[0, 1], callback=events.append)
    assert fitted is localizer
    assert fitted.mask_.method == method and fitted.mask_.prompt == PROMPT and fitted.mask_.removed
    assert fitted.mask_.parameters["seeds"] == [0, 1]
    assert events  # progress reaches the same callback
    learned = {"nemo": ("threshold_", "settings_", "memorized_seeds_", "trace_", "similarity_", "unet_evaluations_"),
               "wanda": ("prompt_norms_", "reference_norms_")}[method]
    assert all(hasattr(fitted, name) for name in learned)
    # The reference prompts are the ones given, not the handle's held-out prompts.
    other = LOCALIZERS[method](HELD_OUT_PROMPTS).fit(handle, PROMPT, seeds=[0, 1])
    if method == "nemo":
        assert fitted.settings_["reference"] == other.settings_["reference"] == "2 reference prompts"
    else:
        assert any(not torch.equal(fitted.reference_norms_[name], other.reference_norms_[name])
                   for name in fitted.reference_norms_)


@pytest.fixture()
def norms_spy(monkeypatch):
    """The prompt lists Wanda records activations for (its reference cache bypassed)."""
    seen = []
    original = wanda.input_norms

    def spy(handle, layers, prompts, *args):
        seen.append(prompts if isinstance(prompts, list) else "<embedding>")
        return original(handle, layers, prompts, *args)

    monkeypatch.setattr(wanda, "input_norms", spy)
    monkeypatch.setattr(wanda, "cached", lambda cache_dir, name, key, compute: compute())
    return seen


WANDA_SETTINGS = {"steps": 2, "record_steps": 1}


def test_run_task_sets_wandas_reference_prompts(handle, norms_spy):
    config = {"image": 0, "method": "wanda", "seeds": [0], "evaluation_seeds": [0],
              "parameters": {**WANDA_SETTINGS, "reference_prompts": REFERENCES}}
    record = run_task(handle, "localize", config)
    assert record.config["parameters"]["reference_prompts"] == REFERENCES
    assert REFERENCES in norms_spy and HELD_OUT_PROMPTS not in norms_spy
    record = run_task(handle, "localize", {**config, "parameters": WANDA_SETTINGS})
    assert record.config["parameters"]["reference_prompts"] is None and HELD_OUT_PROMPTS in norms_spy
    with pytest.raises(ValueError, match="reference_prompts must be"):
        run_task(handle, "localize", {**config, "parameters": {"reference_prompts": "a red car"}})


def test_the_command_line_sets_wandas_reference_prompts(tiny_model_folder, norms_spy, capsys):
    code = main(["localize", "--method", "wanda", "--image", "0", "--seeds", "0", "--evaluation-seeds", "0",
                 "--param", "steps=2", "--param", "record_steps=1",
                 "--param", f"reference_prompts={json.dumps(REFERENCES)}",
                 "--json", "--model", str(tiny_model_folder)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["config"]["parameters"]["reference_prompts"] == REFERENCES
    assert REFERENCES in norms_spy


# ---------------------------------------------------------------------------------------------------------------
# After an analysis raises or is cancelled mid-way: no hook anywhere in the UNet, every weight as before.


def assert_untouched(unet, weights_before: dict[str, torch.Tensor]) -> None:
    for name, module in unet.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hook left on {name or 'the UNet'}"
    weights_after = unet.state_dict()
    assert list(weights_after) == list(weights_before)
    changed = [name for name, weight in weights_after.items() if not torch.equal(weight, weights_before[name])]
    assert not changed, changed


def cancel_after(events: int, of: type) -> Callable[[object], None]:
    """A progress callback that raises `SamplingCancelled` at the `events`-th event of type `of`."""
    seen = []

    def callback(event: object) -> None:
        if isinstance(event, of):
            seen.append(event)
            if len(seen) == events:
                raise SamplingCancelled

    return callback


class UNetFailure(RuntimeError):
    pass


def count_unet_calls(unet, run: Callable[[], None]) -> int:
    calls = []
    counter = unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        run()
    finally:
        counter.remove()
    return len(calls)


def fail_on_unet_call(unet, call: int):
    """A pre-hook making the UNet's `call`-th forward raise; the caller removes it."""
    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) == call:
            raise UNetFailure(f"UNet call {call}")

    return unet.register_forward_pre_hook(hook)


def sample_under(fit_mask):
    def run(handle, callback):
        mask = fit_mask(handle)
        with mask.applied(handle):
            sample(handle, [PROMPT], [0], steps=4, callback=callback)
    return run


# What runs, given the handle and a callback, and the type of event it is cancelled on.
ANALYSES = {
    "nemo": (lambda h, callback: LOCALIZERS["nemo"](REFERENCES).fit(h, PROMPT, seeds=[0, 1], callback=callback),
             TaskProgress),
    "wanda": (lambda h, callback: LOCALIZERS["wanda"](REFERENCES).fit(h, PROMPT, seeds=[0], callback=callback),
              TaskProgress),
    "wanda mask applied": (sample_under(lambda h: LOCALIZERS["wanda"](REFERENCES).fit(h, PROMPT, seeds=[0]).mask_),
                           DenoisingStep),
    "nemo mask applied": (sample_under(lambda h: LOCALIZERS["nemo"](REFERENCES).fit(h, PROMPT, seeds=[0, 1]).mask_),
                          DenoisingStep),
    "localize task": (lambda h, callback: run_task(h, "localize", {
        "image": 0, "method": "wanda", "seeds": [0], "evaluation_seeds": [0],
        "parameters": {**WANDA_SETTINGS, "reference_prompts": REFERENCES}}, callback=callback), DenoisingStep),
    "agreement task": (lambda h, callback: run_task(h, "agreement", {
        "image": 0, "seeds": [0, 1], "nemo": {"threshold": -1.0, "steps": 3, "theta_start": 1.0, "refine": False,
                                              "scales": 2, "reference_prompts": REFERENCES},
        "wanda": {**WANDA_SETTINGS, "reference_prompts": REFERENCES}},
        inputs={"triggers": encode_prompts(h, [PROMPT, REFERENCES[0]])}, callback=callback), TaskProgress),
    "discrepancy": (lambda h, callback: activation_discrepancy(h, encode_prompts(h, [PROMPT, REFERENCES[0]]), "ff",
                                                               steps=4), None),
}


@pytest.mark.parametrize("name", sorted(name for name, (_, event_type) in ANALYSES.items() if event_type))
def test_a_cancelled_analysis_leaves_the_unet_untouched(handle, name):
    run, event_type = ANALYSES[name]
    weights_before = {key: value.clone() for key, value in handle.unet.state_dict().items()}
    with pytest.raises(SamplingCancelled):
        run(handle, cancel_after(2, event_type))
    assert_untouched(handle.unet, weights_before)


@pytest.mark.parametrize("name", sorted(ANALYSES))
def test_an_analysis_that_raises_leaves_the_unet_untouched(handle, name):
    run, _ = ANALYSES[name]
    # The last UNet call of the run: inside the hooks of the analysis (recording, blocking, or a mask applied).
    # Counted on a second run: the first fills the disk caches of the task runs.
    run(handle, None)
    last_call = count_unet_calls(handle.unet, lambda: run(handle, None))
    weights_before = {key: value.clone() for key, value in handle.unet.state_dict().items()}
    failure = fail_on_unet_call(handle.unet, last_call)
    try:
        with pytest.raises(UNetFailure):
            run(handle, None)
    finally:
        failure.remove()
    assert_untouched(handle.unet, weights_before)
