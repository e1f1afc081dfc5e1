"""What the task runners share: the estimators a configuration names, request limits over a whole configuration,
sampling and target settings, and the mitigation masks a configuration names. `analysis.tasks` (the kinds of the
engine) and `analysis.inside_tasks` (the Inside view's kinds) build their records on these.

Every function raises ValueError naming the bad value.
"""

from __future__ import annotations

import collections.abc
import math
import types
import typing
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from analysis.attribution import GradientNorm, IntegratedGradients, Occlusion
from analysis.export import RunRecord
from analysis.limits import (MAX_DENOISING_STEPS, MAX_LIST, MAX_PROMPT_CHARS, MAX_SEARCH_BATCH, MAX_SEARCH_STEPS,
                             MAX_SEED, MAX_SEEDS, MAX_STARTS)
from analysis.localize import ONCE_PER_MODEL, nemo, reference_sample, wanda
from analysis.masks import Mask
from analysis.model import ModelHandle
from analysis.progress import Callback, report
from analysis.projection import Projection
from analysis.settings import Sampling, as_json, check, fill, seed_list, shown, whole_number

BUNDLED_MODEL_NAME = "bundled demo model"  # what `load_model(None)` names the bundled model
MASK_PREFIX = "mask."


@dataclass(frozen=True)
class Method:
    """An estimator a configuration names, and the constructor arguments a configuration sets (its `parameters`;
    their defaults are the estimator's own). Arguments that change how a run goes, not what it finds (a cache
    folder, a batch size), are not among them."""

    estimator: type
    parameters: tuple[str, ...]
    default_seeds: tuple[int, ...] = ()  # a localizer's `fit` seeds

    def defaults(self) -> dict:
        instance = self.estimator()
        return as_json({name: getattr(instance, name) for name in self.parameters})

    def checked(self, what: str, parameters: dict) -> dict:
        """`parameters` (JSON values) when each is of its constructor argument's annotated type, else ValueError: an
        estimator's constructor takes them unchecked, and a string where a number belongs fails only mid-run."""
        hints = typing.get_type_hints(self.estimator.__init__)
        for name, value in parameters.items():
            if name in hints and not _of_type(value, hints[name]):
                raise ValueError(f"{what} {name} must be {_type_name(hints[name])}, got {shown(value)}")
        return as_json(parameters)


def _of_type(value, hint) -> bool:
    """Whether a JSON value is of a constructor's annotated type (a finite number for float, a list for a
    sequence); an annotation of another kind lets anything through."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_of_type(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint in (str, Path):
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence):
        return isinstance(value, list) and all(_of_type(item, args[0]) for item in value) if args else True
    return True


def _type_name(hint) -> str:
    """'a finite number or null', 'a list of whole numbers', ... for a message."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    names = {type(None): "null", bool: "true or false", int: "a whole number", float: "a finite number",
             str: "a text", Path: "a path"}
    if hint in names:
        return names[hint]
    if origin in (list, tuple, collections.abc.Sequence) and args:
        plural = {int: "whole numbers", float: "numbers", str: "texts", bool: "booleans"}
        return f"a list of {plural.get(args[0], args[0])}"
    return str(hint)


LOCALIZERS = {
    "nemo": Method(nemo.NeMo, ("reference_prompts", "settings", "layers", "threshold", "calibration_seeds", "steps",
                               "step_index", "advance_latents", "window", "scales", "ms_ssim", "duplicates",
                               "threshold_guidance", "theta_start", "theta_step", "theta_min", "refine"),
                   nemo.DEFAULT_SEEDS),
    "wanda": Method(wanda.Wanda, ("reference_prompts", "sparsity", "layers", "record_steps", "steps"),
                    wanda.DEFAULT_SEEDS),
}
ATTRIBUTIONS = {"gradient_norm": Method(GradientNorm, ("seeds",)),
                "integrated_gradients": Method(IntegratedGradients, ("seeds", "n_steps", "internal_batch_size")),
                "occlusion": Method(Occlusion, ("seeds",))}
# Projection settings beside its method ("trigger_map" has `method` and `parameters`, as a localizer does).
PROJECTION = Method(Projection, ("tokens", "n_neighbors", "min_dist", "perplexity", "seed"))
START_KINDS = ("random", "prompt", "embedding")
# UNet rows per call when NeMo and Wanda run their reference prompts × seeds (500 × 10 with SD v1.4's fallback
# list): one call for all of them would not fit a GPU's memory with SD's UNet.
LOCALIZER_BATCH_ROWS = 64


# ---------------------------------------------------------------------------------------------------------------
# Checking a configuration


# Settings checked by name wherever they appear in a configuration (top level or inside `parameters`, `search`,
# `dori`, ...): a count of seeds, of denoising or search steps, of seeds per search step, of starts.
COUNT_LIMITS = {"steps": MAX_DENOISING_STEPS, "n_steps": MAX_DENOISING_STEPS, "record_steps": MAX_DENOISING_STEPS,
                "batch_size": MAX_SEARCH_BATCH, "directions": MAX_STARTS, "eval_seeds": MAX_SEEDS}
# Inside a Dori search's settings (an attack's "search", fine-tuning's "dori"), "steps" counts search steps.
SEARCH_SETTINGS = ("search", "dori")
MAX_CONFIG_DEPTH = 8
MAX_TEXT_CHARS = 10_000  # any string of a configuration (prompts are held to MAX_PROMPT_CHARS)


def check_limits(value, name: str = "configuration", depth: int = 0, parent: str = "") -> None:
    """ValueError if `value` (a configuration, read from JSON) is larger than one request may be
    (`analysis.limits`): too deep, a list or text too long, a non-finite number, too many seeds, steps or starts."""
    if depth > MAX_CONFIG_DEPTH:
        raise ValueError(f"the configuration is nested more than {MAX_CONFIG_DEPTH} levels deep (at {name})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
        raise ValueError(f"{name} has {len(value)} characters; at most {MAX_TEXT_CHARS} are accepted")
    if isinstance(value, list):
        limit = MAX_SEEDS if name.endswith("seeds") else MAX_STARTS if name == "starts" else MAX_LIST
        if len(value) > limit:
            raise ValueError(f"{name} lists {len(value)} values; at most {limit} are accepted")
        for item in value:
            check_limits(item, name, depth + 1, parent)
    if isinstance(value, dict):
        for key, item in value.items():
            check_limits(item, str(key), depth + 1, name)
    limit = MAX_SEARCH_STEPS if name == "steps" and parent in SEARCH_SETTINGS else COUNT_LIMITS.get(name)
    if limit is not None and isinstance(value, int) and not isinstance(value, bool) and value > limit:
        raise ValueError(f"{name} must be at most {limit}, got {value}")
    if name.endswith("seed") and isinstance(value, int) and not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} must be a whole number from 0 to {MAX_SEED}, got {value}")


def method_parameters(what: str, methods: dict[str, Method], config: dict) -> dict:
    """`{"method", "parameters"}` with every parameter of the chosen method filled in."""
    method = config.get("method")
    if method not in methods:
        raise ValueError(f"unknown {what} method {method!r}; choose one of {sorted(methods)}")
    parameters = fill(f"{method} parameter", methods[method].defaults(), config.get("parameters"))
    return dict(method=method, parameters=methods[method].checked(f"{method} parameter", parameters))


def sampling_settings(handle: ModelHandle, config: dict) -> dict:
    steps = handle.default_steps if config["steps"] is None else config["steps"]
    guidance = handle.default_guidance if config["guidance"] is None else config["guidance"]
    return dict(steps=check(Sampling, "steps", steps), guidance=check(Sampling, "guidance", guidance))


def target_settings(handle: ModelHandle, config: dict, inputs: dict[str, torch.Tensor],
            need_image: bool) -> tuple[dict, str, torch.Tensor | None]:
    """The filled `image`/`prompt` settings, the prompt, and the target image (None when there is none)."""
    index, prompt = config["image"], config["prompt"]
    image = None
    if index is not None:
        if not handle.memorized:
            raise ValueError(f"image {index!r} does not exist: the model has no memorized training images")
        whole_number("image", index, 0, len(handle.memorized) - 1)
        image = handle.memorized[index].image
        prompt = handle.memorized[index].caption if prompt is None else prompt
    if "target" in inputs:
        image = inputs["target"]
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"the target input must be an image [3, H, W], got shape {tuple(image.shape)}")
    if prompt is None:
        raise ValueError("give a prompt or the index of a training image (setting 'image')")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"the prompt must be a non-empty string, got {shown(prompt)}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    if config["prompt"] is not None and any(unicodedata.category(character) == "Cc" for character in prompt):
        # As the app refuses it; a set's caption is the set's to check (`analysis.memorized`).
        raise ValueError(f"the prompt holds control characters (such as a newline, tab or NUL): {shown(prompt)}")
    if need_image and image is None:
        raise ValueError("this analysis needs a target image: give 'image' (a training image's index) "
                         "or a 'target' input")
    return dict(image=index, prompt=prompt), prompt, image


def replicate_what(handle: ModelHandle, target: dict) -> int | str:
    """What `replicate` gets: a training image's index (compared with that image only) when the prompt is its
    caption, else the prompt (compared with every training image)."""
    index = target["image"]
    return index if index is not None and handle.memorized[index].caption == target["prompt"] else target["prompt"]


def embeddings_input(handle: ModelHandle, inputs: dict[str, torch.Tensor], name: str, minimum: int) -> torch.Tensor:
    """Input `name`: `minimum` to MAX_STARTS embeddings `[n, 77, d]` of this model, float32 on the handle's device."""
    if name not in inputs:
        raise ValueError(f"this analysis needs the embeddings as the input {name!r} [n, 77, d]")
    embeddings = inputs[name]
    shape = (handle.tokenizer.model_max_length, handle.unet.config.cross_attention_dim)
    if (embeddings.ndim != 3 or tuple(embeddings.shape[1:]) != shape
            or not minimum <= len(embeddings) <= MAX_STARTS):
        raise ValueError(f"the input {name!r} must hold {minimum} to {MAX_STARTS} embeddings "
                         f"[n, {shape[0]}, {shape[1]}], got shape {tuple(embeddings.shape)}")
    return embeddings.to(handle.device, torch.float32)


def check_dtype(handle: ModelHandle, config: dict) -> str:
    dtype = str(handle.dtype).removeprefix("torch.")
    if config.get("dtype", dtype) != dtype:
        raise ValueError(f"the configuration was recorded in {config['dtype']}, the model is loaded in {dtype}")
    return dtype


def check_data(handle: ModelHandle, config: dict) -> dict:
    """The handle's memorized set, reference prompts and replication metric; ValueError when a recorded
    configuration names others (a rerun must load the model with what it was run against)."""
    settings = handle.data_settings()
    for key, value in settings.items():
        if key in config and as_json(config[key]) != as_json(value):
            raise ValueError(f"the configuration was recorded with {key} {config[key]!r}, the model is loaded "
                             f"with {value!r}")
    return settings


# ---------------------------------------------------------------------------------------------------------------
# Masks


def mask_tensors(mask: Mask) -> dict[str, torch.Tensor]:
    """A mask's layers as record tensors `mask.LAYER`."""
    return {MASK_PREFIX + name: removed for name, removed in mask.removed.items()}


def record_mask(record: RunRecord) -> Mask:
    """The mask a "localize" record found, to apply it again (`with record_mask(record).applied(handle): ...`)."""
    removed = {name.removeprefix(MASK_PREFIX): tensor for name, tensor in record.tensors.items()
               if name.startswith(MASK_PREFIX)}
    if not removed:
        raise ValueError(f"this {record.kind} record holds no mask")
    return Mask(removed, method=record.config["method"], prompt=record.config["prompt"], model=record.model,
                parameters=record.config["parameters"])


def fit_mask(handle: ModelHandle, config: dict, prompt: str, callback: Callback | None) -> Mask:
    """Run the configured localizer (`{"method", "parameters", "seeds"}`) on `prompt`."""
    references = len(config["parameters"].get("reference_prompts")
                     or (reference_sample(handle) if config["method"] == "wanda" else handle.held_out_prompts))
    # The reference statistics are the long part of a first run; the localizer caches them on disk by the weights.
    report(callback, "localize", 0, None, f"{config['method']}: statistics of {references} reference prompts "
                                          f"({ONCE_PER_MODEL}; the bundled model's are shipped)")
    localizer = LOCALIZERS[config["method"]].estimator(**config["parameters"], batch_size=LOCALIZER_BATCH_ROWS)
    return localizer.fit(handle, prompt, config["seeds"], callback=callback).mask_


def localizer_config(method_config: dict | None, default_method: str = "nemo") -> dict:
    config = fill("localize", dict(method=default_method, parameters=None, seeds=None), method_config)
    filled = method_parameters("localize", LOCALIZERS, config)
    prompts = filled["parameters"]["reference_prompts"]
    if prompts is not None and (not isinstance(prompts, list) or not prompts
                                or not all(isinstance(p, str) and p.strip() for p in prompts)):
        raise ValueError(f"reference_prompts must be null (the model's held-out prompts) or a non-empty list of "
                         f"prompts, got {prompts!r}")
    default_seeds = list(LOCALIZERS[filled["method"]].default_seeds)
    filled["seeds"] = seed_list("localize seeds", default_seeds if config["seeds"] is None else config["seeds"])
    return filled


def mitigation_config(value: dict | None, inputs: dict[str, torch.Tensor]) -> dict | None:
    if value is None:
        return None
    if isinstance(value, dict) and value.get("method") == "mask":
        fill("mitigation", dict(method="mask"), value)
        if not any(name.startswith(MASK_PREFIX) for name in inputs):
            raise ValueError("mitigation 'mask' needs the mask as inputs named 'mask.LAYER'")
        return dict(method="mask")
    return localizer_config(value)


@contextmanager
def mitigated(handle: ModelHandle, mitigation: dict | None, inputs: dict[str, torch.Tensor], prompt: str,
               record: RunRecord, callback: Callback | None) -> Iterator[Mask | None]:
    """Run the block with the mitigation's mask applied (its tensors go into the record); no mask for None."""
    if mitigation is None:
        yield None
        return
    if mitigation["method"] == "mask":
        removed = {name.removeprefix(MASK_PREFIX): t.bool() for name, t in inputs.items() if name.startswith(MASK_PREFIX)}
        mask = Mask(removed, method="given", prompt=prompt, model=handle.name)
    else:
        mask = fit_mask(handle, mitigation, prompt, callback)
        record.tensors.update(mask_tensors(mask))
    record.metrics["mitigation_removed"] = sum(mask.counts().values())
    with mask.applied(handle):
        yield mask
