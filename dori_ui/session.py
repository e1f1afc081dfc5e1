"""What the app keeps: the models it may load (shared, read-only) and each browser session's own state.

A `Session` lives in a `gr.State`, so two users never see each other's
results: which model they look at, their mitigation mask, the last run of
each view (for Export) and a stop flag for the running search.
`ModelChoices` holds the loaded models, shared by all sessions because
weights are large and never changed by an event (masks are applied with
hooks for the duration of one event, and model events run one at a time).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import gradio as gr
import torch

from analysis.export import RunRecord
from analysis.images import to_display
from analysis.limits import MAX_PROMPT_CHARS, MAX_RUN_SECONDS
from analysis.masks import Mask
from analysis.metrics import similarity_label
from analysis.memorized import METADATA_FILES, load_memorized_set, readable_tokens, token_count
from analysis.model import ModelHandle, ModelLoadError, load_model
from analysis.settings import setting_of
from analysis.task_settings import mask_tensors

# Subfolders a diffusers Stable Diffusion pipeline folder has (see analysis.model.load_model).
PIPELINE_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")


@dataclass
class Session:
    """One browser session's state. Mutated in place by events; the stop event sets `stop_requested`."""

    model: str  # a name in ModelChoices
    memorized_set: str | None = None  # a memorized set folder chosen in the session (None: the model's own)
    mask: Mask | None = None  # the active mitigation: the session's generations run with it applied
    records: dict = field(default_factory=dict)  # view name -> the RunRecord of its last run
    # Attribution method -> its last RunRecord, so the view can set the methods run on one prompt side by side.
    attributions: dict = field(default_factory=dict)
    stop_requested: bool = False
    finetuned: tuple[str, str] | None = None  # (base, adversarially fine-tuned) model names, set by `use_finetuned`
    # Models this session made (fine-tuned ones), by name: no other session sees or loads them.
    own_models: dict[str, ModelHandle] = field(default_factory=dict)
    # What the header calls those models, for a person (their names are server paths).
    model_labels: dict[str, str] = field(default_factory=dict)
    export_folders: dict[str, Path] = field(default_factory=dict)  # view -> temporary folder of its last export
    # The Inside view's latest runs by label ("timeline · trigger 0", ...) and its two pins, "A" and "B": (label, record).
    inside_results: dict = field(default_factory=dict)
    inside_pins: dict = field(default_factory=dict)


class ModelChoices:
    """The models a session may switch to: those given on the command line and pipeline folders in allowed roots.

    A remote user picks one of `names()` or types a folder, which must lie
    inside an allowed root; nothing else is ever opened.
    """

    def __init__(self, first: ModelHandle, sources: Sequence[str] = (), allowed_roots: Sequence[str | Path] = ()):
        self.allowed_roots = [Path(root).expanduser().resolve() for root in allowed_roots]
        self._handles: dict[str, ModelHandle] = {first.name: first}
        self._sources: dict[str, str] = {str(source): str(source) for source in sources}
        self._with_sets: dict[tuple, ModelHandle] = {}  # (model name, its UNet's id, set folder) -> handle
        self.first = first.name

    def _folders(self) -> list[Path]:
        """The allowed roots and their subfolders, but a symlink leading outside them (which `allowed_source` and
        `with_memorized` would refuse)."""
        return [folder for root in self.allowed_roots if root.is_dir() for folder in [root, *sorted(root.iterdir())]
                if self._inside_roots(folder)]

    def names(self) -> list[str]:
        """The first model, command-line models, and the allowed roots and their subfolders that are pipeline folders.

        """
        found = [str(folder) for folder in self._folders()
                 if all((folder / sub).is_dir() for sub in PIPELINE_SUBFOLDERS)]
        return list(dict.fromkeys([self.first, *self._sources, *found]))

    def memorized_sets(self) -> list[str]:
        """The allowed roots and their subfolders that are imagefolder memorized sets."""
        return [str(folder) for folder in self._folders() if any((folder / name).is_file() for name in METADATA_FILES)]

    def _inside_allowed_roots(self, path: str, what: str) -> str:
        """`path` resolved, if it lies inside an allowed root, else ValueError saying why not."""
        folder = Path(path).expanduser().resolve()
        if not self._inside_roots(folder):
            roots = (", ".join(str(root) for root in self.allowed_roots)
                     or "none (start the app with --allowed-root DIR)")
            raise ValueError(f"{what} {path!r} is not one the app was started with and lies outside the allowed "
                             f"roots ({roots})")
        return str(folder)

    def _inside_roots(self, folder: Path) -> bool:
        resolved = folder.expanduser().resolve()
        return any(resolved.is_relative_to(root) for root in self.allowed_roots)

    def allowed_source(self, name: str) -> str:
        """`name` if the app may load it, else ValueError saying why not."""
        if name in self._handles or name in self._sources:
            return name
        return self._inside_allowed_roots(name, "model")

    def with_memorized(self, handle: ModelHandle, folder: str) -> ModelHandle:
        """`handle` (its weights shared) with the memorized set in `folder`, which must lie inside an allowed root;
        ValueError (a `MemorizedSetError` for a bad set) otherwise. Loaded once per model and set."""
        source = self._inside_allowed_roots(folder, "memorized set")
        key = (handle.name, id(handle.unet), source)
        if key not in self._with_sets:
            memorized = load_memorized_set(source, handle.tokenizer, handle.image_size)
            self._with_sets[key] = replace(handle, memorized=memorized, memorized_set=source)
        return self._with_sets[key]

    def get(self, name: str) -> ModelHandle:
        """The model called `name`, loaded on the first model's device and dtype on first use."""
        source = self.allowed_source(name)
        if source not in self._handles:
            first = self._handles[self.first]
            try:
                # Judged by the same metric as the first model, against its own memorized images.
                self._handles[source] = load_model(source, device=first.device, dtype=first.dtype,
                                                   replication_metric=first.replication_metric)
            except ModelLoadError as err:
                raise ValueError(str(err)) from err
        return self._handles[source]

    def new_session(self) -> Session:
        return Session(model=self.first)


def finetuned_label(base: ModelHandle, record: RunRecord) -> str:
    """A fine-tuned model's name for the header, e.g. "bundled demo model, fine-tuned on: “portrait of astronaut…”,
    6 rounds", from the "finetune" record that made it."""
    captions = [base.memorized[index].caption for index in record.config["targets"]]
    shown = ", ".join(f"“{caption if len(caption) <= 40 else caption[:39] + '…'}”" for caption in captions)
    rounds = record.config["parameters"]["rounds"]
    return f"{base.name}, fine-tuned on: {shown}, {rounds} round{'s' if rounds != 1 else ''}"


def use_finetuned(models: ModelChoices, session: Session, record: RunRecord) -> ModelHandle:
    """Switch the session to the model a "finetune" record wrote, remembering the base for Mitigate's comparison."""
    base = session_handle(models, session)
    try:
        tuned = load_model(record.metrics["model_dir"], device=base.device, dtype=base.dtype,
                           replication_metric=base.replication_metric)
    except ModelLoadError as err:
        raise gr.Error(str(err)) from err
    session.own_models[tuned.name] = tuned
    session.model_labels[tuned.name] = finetuned_label(base, record)
    session.finetuned = (base.name, tuned.name)
    session.model, session.mask, session.memorized_set = tuned.name, None, None  # the tuned folder keeps the set
    session.records["finetune"] = record
    return tuned


def session_model(models: ModelChoices, session: Session, name: str) -> ModelHandle:
    """The model called `name` as this session may see it: one it made, or one of `models`; else a gr.Error."""
    if name in session.own_models:
        return session.own_models[name]
    try:
        return models.get(name)
    except ValueError as err:
        raise gr.Error(str(err)) from err


def session_handle(models: ModelChoices, session: Session) -> ModelHandle:
    """The session's current model, with the session's memorized set if it chose one; a gr.Error if it cannot be
    loaded."""
    handle = session_model(models, session, session.model)
    if session.memorized_set is None:
        return handle
    try:
        return models.with_memorized(handle, session.memorized_set)
    except ValueError as err:
        raise gr.Error(str(err)) from err


def mitigation_settings(session: Session) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """The `mitigation` setting and the `inputs` that make `run_task` run with the session's mask applied."""
    if session.mask is None:
        return None, {}
    return {"method": "mask"}, mask_tensors(session.mask)


def describe_model(handle: ModelHandle, session: Session) -> str:
    """The header line: model, device, dtype, the memorized set, the active mitigation and the replication
    criterion."""
    mitigation = "none"
    if session.mask is not None:
        removed = sum(session.mask.counts().values())
        mitigation = f"{session.mask.method} ({removed} units removed, for “{session.mask.prompt}”)"
    memorized = f"{len(handle.memorized)} images" + (f" from {handle.memorized_set}" if handle.memorized_set else "")
    return (f"**Model:** {session.model_labels.get(handle.name, handle.name)} · **device:** {handle.device} · "
            f"**dtype:** {str(handle.dtype).removeprefix('torch.')} · **memorized:** {memorized} · "
            f"**mitigation:** {mitigation} · **replica:** {handle.replication_metric.describe()}")


def record_similarity(record: RunRecord) -> str:
    """How a record's similarity is called: by the replication metric it was judged with."""
    return similarity_label(record.config["replication"]["metric"])


def verdict_gallery(images: torch.Tensor, seeds: list[int], similarities: list[float] | None = None,
                    replicated: list | None = None, label: str = "similarity") -> list:
    """(picture, caption) pairs for a gr.Gallery: the verdict first (galleries cut long captions), the similarity
    (called `label`, e.g. `record_similarity(record)`), seed."""
    pictures = to_display(images)
    if similarities is None:
        return [(picture, f"seed {seed}") for picture, seed in zip(pictures, seeds)]
    return [(picture, f"{'replicated' if flag else 'not replicated'} · {label} {similarity:.2f} · seed {seed}")
            for picture, seed, similarity, flag in zip(pictures, seeds, similarities, replicated)]


def check_prompt(handle: ModelHandle, prompt: object) -> str:
    """The prompt, stripped; a gr.Error when it is not text, is empty, holds control characters or is longer
    than the text encoder reads."""
    if prompt is not None and not isinstance(prompt, str):
        raise gr.Error(f"The prompt must be text, got {type(prompt).__name__}.")
    prompt = (prompt or "").strip()
    if any(unicodedata.category(character) == "Cc" for character in prompt):
        raise gr.Error("The prompt holds control characters (such as a newline or tab): type it on one line.")
    if not prompt:
        raise gr.Error("The prompt is empty: type a prompt or pick a training image.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise gr.Error(f"The prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted.")
    readable = readable_tokens(handle.tokenizer)
    tokens = token_count(handle.tokenizer, prompt)
    if tokens > readable:
        raise gr.Error(f"The prompt has {tokens} tokens; the text encoder reads at most {readable}, "
                       "so the rest would be cut off silently. Shorten it.")
    return prompt


def check_whole_number(name: str, value: object, low: int, high: int) -> int:
    """`value` as an int; a gr.Error unless it is a whole number in [low, high].

    Whole-number fields are `gr.Number(precision=None)`, which hands over what
    the browser or API client sent (a float, a string, a list, NaN) unrounded:
    this check, not Gradio's rounding, decides and says what is wrong.
    """
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not low <= value <= high or int(value) != value:
        raise gr.Error(f"{name} must be a whole number from {low} to {high}, got {_shown(value)}.")
    return int(value)


def setting_field(label: str, settings: type, name: str, elem_id: str, value: float | None = None,
                  low: int | None = None) -> gr.Number:
    """A field for setting `name` of an analysis's settings class (`analysis.settings`). It opens with the
    setting's default (for a list of seeds: how many) unless given a `value`; "{range}" in `label` shows the
    setting's range (from `low` where the view asks for more, e.g. two seeds to compare)."""
    found = setting_of(settings, name)
    default = len(found.default) if found.check == "seeds" else found.default
    return gr.Number(default if value is None else value, elem_id=elem_id,
                     label=label.format(range=f"{found.low if low is None else low}–{found.high}"),
                     precision=None)


def check_setting(label: str, value: object, settings: type, name: str, low: int | None = None) -> int:
    """A field of `setting_field` checked against its setting's range: a whole number (a count, for seeds)."""
    found = setting_of(settings, name)
    return check_whole_number(label, value, found.low if low is None else low, found.high)


def check_number(name: str, value: object, low: float, high: float, low_open: bool = False) -> float:
    """`value` as a float; a gr.Error unless it is a number in [low, high] ((low, high] when `low_open`)."""
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or not (low < value if low_open else low <= value) or value > high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise gr.Error(f"{name} must be a number in {interval}, got {_shown(value)}.")
    return float(value)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


@dataclass
class AppContext:
    """What every tab builder receives: the models, the session state, the header, and the model-switch hooks."""

    models: ModelChoices
    session: gr.State
    header: gr.Markdown
    # view name -> (fn(session) -> updates, outputs), run after the session switches model.
    on_model_change: dict = field(default_factory=dict)
    max_run_seconds: float = MAX_RUN_SECONDS  # a model event running longer is stopped (dori_ui.streaming)
    # The components the Stop buttons write to (`dori_ui.streaming.on_stop`): a stopped run ends its message there.
    stop_statuses: list = field(default_factory=list)

    def refresh_on_model_change(self, view: str, refresh: Callable[[Session], dict], outputs: list) -> None:
        """After the session switches model, `refresh(session)` updates `outputs` of `view` (a dict of updates by
        component: the new model's images and defaults, the previous model's results cleared)."""
        self.on_model_change[view] = (refresh, outputs)

    def refresh_views(self, event, endpoints: bool = False) -> None:
        """`event` (a model switch) followed, on success, by every registered view's refresh, one after another;
        `endpoints`: each refresh is also the endpoint `refresh_{view}`."""
        for view, (refresh, outputs) in self.on_model_change.items():
            event = event.success(refresh, inputs=self.session, outputs=outputs,
                                  api_name=f"refresh_{view}" if endpoints else False)
