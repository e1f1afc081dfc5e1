"""The Fine-tune view's endpoints, driven by gradio_client on the tiny model."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from analysis.finetune import SIDE_EFFECT_PROMPTS
from analysis.limits import MAX_RUN_SECONDS
from analysis.task_settings import BUNDLED_MODEL_NAME
from dori_ui import finetune_tab
from dori_ui.app import build_app
from served import served

# after the targets: rounds, training steps, triggers, Dori steps, Dori batch, evaluation seeds
COUNTS = (1, 2, 2, 2, 2, 2)
# learning rate, optimiser, what trains, the ordinary captions' term, the moving average's decay (0 = off)
SETTINGS = (1e-4, "adam", "the whole UNet (the paper's)", "toward the noise (L_DM, the paper's)", 0)
TINY_RUN = COUNTS + SETTINGS


@pytest.fixture(scope="module")
def app_url(tiny_handle, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetune_tab, "RUNS", tmp_path_factory.mktemp("finetune"))
        app = build_app(dataclasses.replace(tiny_handle, default_steps=3))
        with served(app) as url:
            yield url


def test_finetune_then_switch_the_session_to_the_tuned_model(app_url, tiny_handle):
    client = Client(app_url, verbose=False)
    caption = tiny_handle.memorized[0].caption
    status, table, side_effects, held_out = client.predict([caption], *TINY_RUN, api_name="/finetune")
    assert status.startswith("Fine-tuned 1 image(s) in 1 round(s)")
    rows = table["data"]
    assert [row[:2] for row in rows] == [["before", caption], [1, caption]]
    assert rows[1][2].endswith("%") and rows[1][4].endswith("%") and -1 <= rows[1][5] <= 1
    # Outside the target: the other memorized image and the held-out prompts, each shown before and after.
    effects = side_effects["data"]
    prompts = tiny_handle.held_out_prompts[:SIDE_EFFECT_PROMPTS]
    assert [row[:2] for row in effects] == ([["memorized, not selected", tiny_handle.memorized[1].caption]]
                                            + [["held-out prompt", prompt] for prompt in prompts])
    assert effects[0][2].endswith("% replicate") and effects[1][2].startswith("similarity ")
    assert [item["caption"] for item in held_out] == [f"{when} · {prompt}" for prompt in prompts
                                                     for when in ("before", "after")]

    header, message = client.predict(api_name="/finetune_use")
    assert "This session now uses the fine-tuned model" in message
    tuned_name = message.removeprefix("This session now uses the fine-tuned model ").removesuffix(".")
    # The header names it for a person; the message says where it is.
    assert f"**Model:** {tiny_handle.name}, fine-tuned on: “{caption}”, 1 round ·" in header
    assert tuned_name != tiny_handle.name

    # Another session still has the original model and no fine-tuned one.
    other = Client(app_url, verbose=False)
    with pytest.raises(AppError, match="Fine-tune a model first"):
        other.predict(api_name="/finetune_use")
    # Nor can it open the tuned model by typing its exact name.
    with pytest.raises(AppError, match="is not one the app was started with"):
        other.predict(tuned_name, api_name="/switch_model")


@pytest.mark.parametrize("arguments, message", [
    (([], *TINY_RUN), "Choose at least one image"),
    ((["not a memorized caption"], *TINY_RUN), "not in the list of choices"),
    ((None, 0, 2, 2, 2, 2, 2, *SETTINGS), "Rounds must be a whole number from 1 to 100"),
    ((None, 1, 2, 2, 2, 2, 65, *SETTINGS), "Evaluation seeds must be a whole number from 1 to 64"),
    ((None, *COUNTS, 0, *SETTINGS[1:]), "Learning rate must be a number in"),
    ((None, *COUNTS, *SETTINGS[:-1], 1), "decay \\(0 = off, else e.g. 0.99\\) must be a number in \\[0, 0.9999\\]"),
])
def test_bad_settings_give_a_clear_message(app_url, tiny_handle, arguments, message):
    targets = [tiny_handle.memorized[0].caption] if arguments[0] is None else arguments[0]
    with pytest.raises(AppError, match=message):
        Client(app_url, verbose=False).predict(targets, *arguments[1:], api_name="/finetune")


def test_the_training_settings_reach_the_saved_model(app_url, tiny_handle):
    settings = (3e-4, "sgd", "cross-attention only", "toward the original model (distillation)", 0.9)
    status, *_ = Client(app_url, verbose=False).predict([tiny_handle.memorized[1].caption], *COUNTS, *settings,
                                                       api_name="/finetune")
    model_dir = Path(status.split("`")[1])
    params = json.loads((model_dir / "memorized.json").read_text())["adversarial_finetuning"]["params"]
    assert (params["lr"], params["optimizer"], params["trainable"], params["utility_loss"], params["ema_decay"]) == (
        3e-4, "sgd", "attn2", "distillation", 0.9)


def test_each_finished_round_lands_in_the_table_as_it_finishes(app_url, tiny_handle):
    caption = tiny_handle.memorized[0].caption
    job = Client(app_url, verbose=False).submit([caption], 2, *COUNTS[1:], *SETTINGS, api_name="/finetune")
    job.result()
    statuses = [output[0] for output in job.outputs()]
    # The first round's rows are shown while the second runs, then the finished run's.
    landed = next(i for i, status in enumerate(statuses) if status.startswith("Round 1 of 2 finished"))
    assert [row[:2] for row in job.outputs()[landed][1]["data"]] == [["before", caption], [1, caption]]
    assert any(status.startswith("Round 2 of 2 finished") for status in statuses[landed + 1:])
    assert statuses[-1].startswith("Fine-tuned 1 image(s) in 2 round(s)")


def test_the_default_run_fits_the_apps_time_limit_at_the_measured_cost(app_url):
    """The fields open with settings whose estimate (from docs/results/bench_finetune_round.md) fits the limit,
    and the status says how long a run will take before it starts, or that it will not fit."""
    fields = {c["props"]["elem_id"]: c["props"].get("value") for c in Client(app_url, verbose=False).config["components"]
              if str(c["props"].get("elem_id", "")).startswith("finetune-")}
    shown = dict(rounds=fields["finetune-rounds"], steps_per_round=fields["finetune-steps"],
                 triggers_per_image=fields["finetune-triggers"], eval_seeds=fields["finetune-eval-seeds"],
                 dori=dict(steps=fields["finetune-dori-steps"], batch_size=fields["finetune-dori-batch"]))
    assert shown["rounds"] >= 2
    assert finetune_tab.estimated_seconds(shown, 1) <= finetune_tab.PLANNED_SHARE * MAX_RUN_SECONDS
    bundled = SimpleNamespace(name=BUNDLED_MODEL_NAME)
    note = finetune_tab.duration_note(bundled, shown, 1, MAX_RUN_SECONDS)
    assert note.startswith("Estimated: about ") and "more than the app's limit" not in note
    engine = dict(shown, rounds=6, triggers_per_image=4)  # the engine's defaults, the view's before
    assert "more than the app's limit of 1800 s" in finetune_tab.duration_note(bundled, engine, 1, MAX_RUN_SECONDS)


def test_a_run_says_how_long_it_takes_before_and_while_it_runs(app_url, tiny_handle):
    settings = (2e-4, *SETTINGS[1:])  # not the settings of a finished run, which would resume with nothing to do
    job = Client(app_url, verbose=False).submit([tiny_handle.memorized[0].caption], 2, *COUNTS[1:], *settings,
                                                api_name="/finetune")
    job.result()
    statuses = [output[0] for output in job.outputs()]
    assert statuses[0].startswith("Fine-tuning… How long a round takes on this model is known after the first one")
    assert any(status.startswith("Round 1 of 2 finished") and " s left." in status for status in statuses)
