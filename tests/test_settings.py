"""Each analysis's settings are defined once: the command line's flags and the app's fields take their defaults
and ranges from the settings classes, and `run_task` fills a configuration from them."""

from __future__ import annotations

import ast
import re

import pytest

from analysis.cli import build_parser
from analysis.dori import DoriSearch
from analysis.dori_tasks import AttackSettings
from analysis.finetune import AdversarialFineTuning
from analysis.inside_tasks import DetectSettings
from analysis.limits import MAX_RUN_SECONDS
from analysis.model import REPO_ROOT
from analysis.replication_tasks import LocalizeSettings, ReplicateSettings, SweepSettings
from analysis.settings import Sampling, as_json, defaults, setting_of
from analysis.tasks import TASKS
from dori_ui import finetune_tab
from dori_ui.app import build_app

CLI_FLAGS = [
    ("replicate", "--seeds", ReplicateSettings, "seeds"),
    ("replicate", "--steps", Sampling, "steps"),
    ("localize", "--evaluation-seeds", LocalizeSettings, "evaluation_seeds"),
    ("attack", "--search-steps", DoriSearch, "steps"),
    ("attack", "--batch-size", DoriSearch, "batch_size"),
    ("attack", "--lr", DoriSearch, "lr"),
    ("attack", "--search-seed", DoriSearch, "seed"),
    ("attack", "--evaluation-seeds", AttackSettings, "evaluation_seeds"),
    ("sweep", "--seeds", SweepSettings, "seeds"),
    ("sweep", "--directions", SweepSettings, "directions"),
    ("detect", "--seeds", DetectSettings, "seeds"),
    ("triggers", "--search-steps", DoriSearch, "steps"),
]
# elem_id, settings class, setting; the value a field opens with where the view chooses its own (else the default).
APP_FIELDS = {
    "replicate-seeds": (ReplicateSettings, "seeds", None),
    "replicate-steps": (Sampling, "steps", "model"),
    "perturb-steps": (DoriSearch, "steps", None),
    "perturb-batch": (DoriSearch, "batch_size", None),
    "perturb-eval-seeds": (AttackSettings, "evaluation_seeds", None),
    "perturb-generation-steps": (Sampling, "steps", "model"),
    "sweep-directions": (SweepSettings, "directions", None),
    "sweep-seeds": (SweepSettings, "seeds", 2),
    "mitigate-steps": (Sampling, "steps", "model"),
    "mitigate-eval-seeds": (LocalizeSettings, "evaluation_seeds", None),
    "inside-seeds": (DetectSettings, "seeds", None),
    "inside-steps": (Sampling, "steps", "model"),
    "trigger-map-steps": (DoriSearch, "steps", None),
    # The Fine-tune view opens with what fits the app's time limit on this CPU (its own named values).
    "finetune-rounds": (AdversarialFineTuning, "rounds", finetune_tab.default_rounds(MAX_RUN_SECONDS)),
    "finetune-steps": (AdversarialFineTuning, "steps_per_round", None),
    "finetune-triggers": (AdversarialFineTuning, "triggers_per_image", finetune_tab.TRIGGERS_PER_ROUND),
    "finetune-dori-steps": (DoriSearch, "steps", None),
    "finetune-dori-batch": (DoriSearch, "batch_size", None),
    "finetune-eval-seeds": (AdversarialFineTuning, "eval_seeds", None),
}


def flag(command: str, option: str):
    subcommands = next(action for action in build_parser()._actions if action.dest == "command")
    return next(action for action in subcommands.choices[command]._actions if option in action.option_strings)


@pytest.mark.parametrize("command, option, settings, name", CLI_FLAGS)
def test_a_flag_takes_its_default_and_range_from_the_setting(command, option, settings, name):
    action, found = flag(command, option), setting_of(settings, name)
    assert action.default == as_json(found.default)
    assert (action.type.low, action.type.high) == (found.low, found.high)


def test_a_flag_refuses_what_its_setting_does(capsys):
    high = setting_of(DoriSearch, "batch_size").high
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(["attack", "--batch-size", str(high + 1)])
    assert stopped.value.code == 2 and f"from 1 to {high}" in capsys.readouterr().err


@pytest.fixture(scope="module")
def components(tiny_handle):
    app = build_app(tiny_handle)
    return {block.elem_id: block for block in app.blocks.values() if getattr(block, "elem_id", None)}


@pytest.mark.parametrize("elem_id", APP_FIELDS)
def test_an_app_field_takes_its_default_and_range_from_the_setting(components, tiny_handle, elem_id):
    settings, name, value = APP_FIELDS[elem_id]
    field, found = components[elem_id], setting_of(settings, name)
    assert f"({found.low}–{found.high}" in field.label or f" {found.low}–{found.high})" in field.label
    default = len(found.default) if found.check == "seeds" else found.default
    assert field.value == {None: default, "model": tiny_handle.default_steps}.get(value, value)


def test_the_app_opens_with_dori_s_learning_rate(components):
    assert components["perturb-lr"].value == DoriSearch.lr


def test_dori_s_learning_rate_is_written_once():
    """The literal 0.1 on a line about a learning rate, as code (not prose), in the engine and the app."""
    found = []
    for path in sorted([*(REPO_ROOT / "analysis").rglob("*.py"), *(REPO_ROOT / "dori_ui").rglob("*.py")]):
        text = path.read_text()
        lines = text.splitlines()
        found += [f"{path.relative_to(REPO_ROOT)}:{node.lineno}" for node in ast.walk(ast.parse(text))
                  if isinstance(node, ast.Constant) and node.value == 0.1
                  and re.search(r"\blr\b|learning rate", lines[node.lineno - 1], re.IGNORECASE)]
    assert len(found) == 1 and found[0].startswith("analysis/dori.py:"), found


def test_every_kind_has_a_settings_class_with_help():
    for kind, task in TASKS.items():
        assert defaults(task.settings), kind
        assert all(setting_of(task.settings, name).help for name in defaults(task.settings)), kind


@pytest.mark.parametrize("parameters, message", [
    (dict(rounds=0), "finetune rounds must be a whole number from 1 to"),
    (dict(steps_per_round=10**9), "finetune steps_per_round must be a whole number from 1 to"),
    (dict(dori=dict(lr=-1.0)), "finetune dori lr must be a number of at least 0"),
])
def test_fine_tuning_is_held_to_its_settings_before_it_starts(tiny_handle, tmp_path, parameters, message):
    from analysis.tasks import run_task

    with pytest.raises(ValueError, match=message):
        run_task(tiny_handle, "finetune", dict(targets=[0], out_dir=str(tmp_path), parameters=parameters))
    assert not any(tmp_path.iterdir())
