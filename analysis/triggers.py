"""Trigger sets: many Dori searches from random starts toward one image, kept on disk (docs/methods.md §7).

A folder holds two files:

* `triggers.safetensors`: `embeddings` `[N, 77, d]` (row i is trigger i) and `target` `[3, H, W]`;
* `triggers.json`: `config` (model, image caption, search parameters, ...) and
  `triggers`, one metadata dict per trigger (start, final loss, loss curve,
  distances, replication if evaluated).

`build_trigger_set` searches `starts_per_batch` starts per `DoriSearch.fit`
call and rewrites both files after every batch, each through a temporary file
and `os.replace`. The JSON is written last and is what counts: a rerun on the
same folder resumes after the triggers it lists and never recomputes them.
Trigger i starts from `Start.random(seed + i)` and draws its noise with search
seed `search.seed + i`, so it does not depend on batching, and a resumed set
equals one computed in a single run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from analysis.dori import DoriSearch, DoriStep, Start, evaluate
from analysis.memorized import MemorizedImage
from analysis.model import REPO_ROOT, ModelHandle

EMBEDDINGS_FILE = "triggers.safetensors"
METADATA_FILE = "triggers.json"
SHIPPED_TRIGGERS = REPO_ROOT / "assets" / "triggers"  # a set per memorized image of the bundled model


def shipped_set_folder(image_index: int, root: str | Path = SHIPPED_TRIGGERS) -> Path:
    """The folder of the shipped trigger set of the bundled model's memorized image `image_index`."""
    return Path(root) / f"image-{image_index}"


@dataclass
class TriggerProgress:
    """What a `build_trigger_set` callback receives after every search step."""

    finished: int  # triggers finished and saved so far
    total: int  # triggers the set will hold
    step: DoriStep  # the step just taken in the current batch


@dataclass
class TriggerSet:
    config: dict
    triggers: list[dict]  # metadata of trigger i at position i
    embeddings: torch.Tensor  # [len(triggers), 77, d] float32
    target: torch.Tensor  # [3, H, W] the image the triggers aim at

    @property
    def complete(self) -> bool:
        return len(self.triggers) == self.config["count"]

    @classmethod
    def load(cls, folder: str | Path) -> TriggerSet:
        """The set `save` wrote to `folder`; ValueError for a folder that holds anything else."""
        folder = Path(folder)
        try:
            metadata = json.loads((folder / METADATA_FILE).read_text())
            tensors = load_file(str(folder / EMBEDDINGS_FILE))
            # The embeddings file is written first, so it may hold a batch the JSON does not list yet.
            count = len(metadata["triggers"])
            return cls(metadata["config"], metadata["triggers"], tensors["embeddings"][:count], tensors["target"])
        except Exception as err:  # noqa: BLE001 - safetensors raises its own errors; a foreign file, any key error
            raise ValueError(f"{folder} does not hold a trigger set written by `dori triggers` ({METADATA_FILE} "
                             f"and {EMBEDDINGS_FILE}): {type(err).__name__}") from err

    def save(self, folder: str | Path) -> None:
        """Write both files, each atomically; the JSON last."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = dict(embeddings=self.embeddings.contiguous(), target=self.target.contiguous())
        _replace_atomically(folder / EMBEDDINGS_FILE, lambda path: save_file(tensors, str(path)))
        text = json.dumps(dict(config=self.config, triggers=self.triggers), indent=1)
        _replace_atomically(folder / METADATA_FILE, lambda path: path.write_text(text))


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)


def build_trigger_set(handle: ModelHandle, folder: str | Path, target: MemorizedImage, count: int = 100,
                      search: DoriSearch | None = None, starts_per_batch: int = 10, seed: int = 0,
                      scale: float | None = None, evaluation_seeds: Sequence[int] | None = None,
                      callback: Callable[[TriggerProgress], None] | None = None) -> TriggerSet:
    """Find `count` triggers for `target.image` from random starts, saved in `folder`; resume what is there.

    `scale` goes to `Start.random`. `evaluation_seeds`: also generate each
    trigger with these seeds (the handle's default steps and guidance) and
    store its replication rate (by the handle's replication metric, which the config names). `callback` runs after every search step and
    may raise (e.g. `SamplingCancelled`) to stop; finished batches stay saved.
    Raises ValueError when the folder holds a set made with other settings.
    """
    search = search or DoriSearch()
    config = dict(model=handle.name, caption=target.caption, count=count, search=dataclasses.asdict(search),
                  starts_per_batch=starts_per_batch, seed=seed, scale=scale,
                  evaluation=None if evaluation_seeds is None else dict(
                      seeds=[int(s) for s in evaluation_seeds], steps=handle.default_steps,
                      guidance=handle.default_guidance, replication=handle.replication_metric.settings()))
    config = json.loads(json.dumps(config))  # as it reads back from disk (tuples become lists)
    target_image = target.image.float().cpu()
    if (Path(folder) / METADATA_FILE).is_file():
        trigger_set = TriggerSet.load(folder)
        if trigger_set.config != config or not torch.equal(trigger_set.target, target_image):
            raise ValueError(f"{folder} holds a trigger set made with other settings: {trigger_set.config}; "
                             "use another folder or the same settings")
    else:
        width = handle.unet.config.cross_attention_dim
        trigger_set = TriggerSet(config, [], torch.empty(0, handle.tokenizer.model_max_length, width), target_image)

    while not trigger_set.complete:
        first = len(trigger_set.triggers)
        batch = range(first, min(first + starts_per_batch, count))
        starts = [Start.random(seed + i, scale) for i in batch]

        def report(step: DoriStep) -> None:
            if callback is not None:
                callback(TriggerProgress(first, count, step))

        result = dataclasses.replace(search, seed=search.seed + first).fit(
            handle, target.image, starts, prompt=target.caption, callback=report)
        rates = similarities = None
        if evaluation_seeds is not None:
            generated = evaluate(handle, result.embeddings, target.image, evaluation_seeds)
            rates, similarities = generated.rates.tolist(), generated.similarities.mean(dim=1).tolist()
        for row, (index, start) in enumerate(zip(batch, starts)):
            trigger_set.triggers.append(dict(
                # The last step's loss is one batch of (ε, t), so noisy: `losses` holds the whole curve.
                index=index, start=start.describe(), final_loss=result.losses[-1, row].item(),
                losses=result.losses[:, row].tolist(),
                distance_from_start=result.from_start.l2[row].norm().item(),
                distance_from_prompt=result.from_prompt.l2[row].norm().item(),
                replication_rate=None if rates is None else rates[row],
                mean_similarity=None if similarities is None else similarities[row]))
        trigger_set.embeddings = torch.cat([trigger_set.embeddings, result.embeddings])
        trigger_set.save(folder)
    return trigger_set
