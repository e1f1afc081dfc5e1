"""Settings defined once: each analysis's settings are a small dataclass whose fields carry their default, their
help text and their range; `run_task`, the command line (`analysis.cli_parser`) and the app's fields read them.

    @dataclass
    class SweepSettings(Mitigated, Sampling, Target):
        directions: int = whole(4, "random directions per radius", 1, MAX_STARTS)

A field made with `whole` (a whole number in [low, high]), `real` (a number of at least low), `seeds_setting`
(a list of 1 to MAX_SEEDS seeds) or `setting` (anything; its runner checks it) says what `check` holds it to.
The ranges are the request limits of `analysis.limits`. An estimator that is itself a dataclass
(`analysis.dori.DoriSearch`) declares its fields the same way and is its own settings object; the estimators that
are not name their configurable arguments in `analysis.task_settings` (`Method`).

Every check raises ValueError naming the bad value.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from analysis.limits import MAX_DENOISING_STEPS, MAX_SEED, MAX_SEEDS

DEFAULT_SEEDS = (0, 1, 2, 3)  # what an analysis generates with unless told otherwise


def setting(default, help: str):
    """A setting its runner checks (a prompt, a method's name, a nested configuration, ...)."""
    return dataclasses.field(default=default, metadata=dict(help=help, check=None, low=None, high=None))


def whole(default, help: str, low: int = 0, high: int | None = None):
    """A whole number in [low, high] (None: the runner's default, e.g. the model's steps)."""
    return dataclasses.field(default=default, metadata=dict(help=help, check="whole", low=low, high=high))


def real(default, help: str, low: float | None = None):
    """A number of at least `low`."""
    return dataclasses.field(default=default, metadata=dict(help=help, check="real", low=low, high=None))


def seeds_setting(default, help: str):
    """A list of 1 to MAX_SEEDS seeds from 0 to MAX_SEED (a tuple as its default; a configuration holds a list)."""
    return dataclasses.field(default=default, metadata=dict(help=help, check="seeds", low=1, high=MAX_SEEDS))


@dataclass(frozen=True)
class Setting:
    """One field of a settings class, as the command line and the app show it."""

    name: str
    default: object
    help: str
    check: str | None  # "whole", "real", "seeds" or None
    low: float | None
    high: float | None


def setting_of(settings: type, name: str) -> Setting:
    field = {field.name: field for field in dataclasses.fields(settings)}[name]
    return Setting(name, field.default, **field.metadata)


def defaults(settings: type) -> dict:
    """Every setting's default, as a configuration holds it (tuples as lists)."""
    return {field.name: as_json(field.default) for field in dataclasses.fields(settings)}


@dataclass
class Target:
    """What an analysis is about: a memorized training image (its caption the default prompt) and/or a prompt."""

    image: int | None = setting(None, "index of a memorized training image (its caption is the prompt)")
    prompt: str | None = setting(None, "a prompt (with image: the prompt to use instead of the caption)")


@dataclass
class Steps:
    steps: int | None = whole(None, "denoising steps (default: the model's)", 1, MAX_DENOISING_STEPS)


@dataclass
class Sampling(Steps):
    """How generations are sampled; None: the model's own."""

    guidance: float | None = real(None, "classifier-free guidance (default: the model's)")


@dataclass
class Mitigated:
    mitigation: dict | None = setting(None, "null, {'method': 'nemo'|'wanda', 'parameters': {...}} or "
                                            "{'method': 'mask'} (the mask.* inputs)")


def check(settings: type, name: str, value, label: str | None = None):
    """`value` held to setting `name` of `settings` (the error names it `label`, by default `name`)."""
    found = setting_of(settings, name)
    label = name if label is None else label
    if found.check == "whole":
        return whole_number(label, value, found.low, found.high)
    if found.check == "real":
        return number(label, value, found.low)
    if found.check == "seeds":
        return seed_list(label, value)
    return value


# ---------------------------------------------------------------------------------------------------------------
# Checks of one value


def as_json(value):
    """As the value reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def fill(what: str, defaults: dict, given: dict | None) -> dict:
    """The defaults updated with what was given; unknown settings refused."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ValueError(f"the {what} configuration must be a JSON object, got {shown(given)}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {what} setting(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


def whole_number(name: str, value, low: int = 0, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise ValueError(f"{name} must be a whole number {bound}, got {value!r}")
    return value


def number(name: str, value, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or (low is not None and value < low):
        raise ValueError(f"{name} must be a number{f' of at least {low}' if low is not None else ''}, got {value!r}")
    return float(value)


def seed_list(name: str, value) -> list[int]:
    if not isinstance(value, list) or not value or len(value) > MAX_SEEDS:
        raise ValueError(f"{name} must be a list of 1 to {MAX_SEEDS} seeds, got {shown(value)}")
    return [whole_number(f"a seed in {name}", seed, 0, MAX_SEED) for seed in value]


def shown(value) -> str:
    """`value` for an error message, cut short (a configuration may come from an untrusted export)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."
