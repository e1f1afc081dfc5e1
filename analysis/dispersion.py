"""How far apart embeddings lie: pairwise L2 distances of a set, beside reference sets (docs/methods.md §7).

The paper's claim: Dori triggers found from random starts for one image lie
at least as far apart as the embeddings of different prompts, so there is no
single small region of embedding space that a local mitigation could close.
Distances are between whole embeddings flattened as `analysis.projection`
flattens them (all 77 tokens unless `tokens` says otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from analysis.dori import Start
from analysis.model import ModelHandle
from analysis.projection import flatten_embeddings
from analysis.sampling import encode_prompts


def pairwise_l2(embeddings: torch.Tensor, tokens: str | list[int] = "all") -> np.ndarray:
    """L2 distance of every pair i < j of embeddings `[n, 77, d]`, condensed `[n(n-1)/2]` float64."""
    vectors = torch.from_numpy(flatten_embeddings(embeddings, tokens))
    if len(vectors) < 2:
        raise ValueError(f"pairwise distances need at least 2 embeddings, got {len(vectors)}")
    return torch.pdist(vectors).numpy()


@dataclass
class Dispersion:
    """Pairwise L2 distances within one set of embeddings."""

    size: int  # embeddings in the set
    distances: np.ndarray  # [size(size-1)/2], every pair once (for histograms)
    mean: float
    median: float
    std: float
    min: float
    max: float

    def as_dict(self) -> dict:
        """JSON-ready summary, without the distances."""
        return dict(size=self.size, mean=self.mean, median=self.median, std=self.std, min=self.min, max=self.max)


def dispersion(sets: Mapping[str, torch.Tensor], tokens: str | list[int] = "all") -> dict[str, Dispersion]:
    """The pairwise distances of each named set of embeddings `[n, 77, d]`."""
    result = {}
    for name, embeddings in sets.items():
        distances = pairwise_l2(embeddings, tokens)
        result[name] = Dispersion(len(embeddings), distances, float(distances.mean()), float(np.median(distances)),
                                  float(distances.std()), float(distances.min()), float(distances.max()))
    return result


def reference_sets(handle: ModelHandle, n_random: int = 100, seed: int = 0,
                   held_out_prompts: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Embeddings to compare triggers with, float32 on the CPU, each `[n, 77, d]`.

    "memorized prompts": the captions of `handle.memorized`; "held-out
    prompts": `held_out_prompts` (None: the handle's); "random": `n_random`
    Gaussian embeddings drawn as Dori's random starts are (`Start.random(seed + i)`),
    so they show how far apart the triggers' starting points were.
    """
    held_out = list(handle.held_out_prompts if held_out_prompts is None else held_out_prompts)
    sets = {"memorized prompts": [image.caption for image in handle.memorized], "held-out prompts": held_out}
    empty = [name for name, prompts in sets.items() if len(prompts) < 2]
    if empty:
        raise ValueError(f"reference sets {empty} have fewer than 2 prompts")
    result = {name: encode_prompts(handle, prompts).float().cpu() for name, prompts in sets.items()}
    result["random"] = torch.stack([Start.random(seed + i).resolve(handle).cpu() for i in range(n_random)])
    return result
