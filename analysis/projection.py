"""2-D maps of text embeddings: UMAP, PCA or t-SNE behind one interface (docs/methods.md §7).

    projection = Projection("umap").fit(reference)   # reference: [n, 77, d] embeddings
    xy = projection.transform(triggers)              # [m, 2]
    projection.reference_xy_                          # [n, 2], where the reference lands

What is projected: each embedding flattened over the chosen token positions
(`tokens`, default all 77) into one vector, raw, without scaling. Dori moves
all 77 positions and a CLIP encoder's padding positions carry the prompt too
(they are contextualised), so the whole `[77, d]` is the trigger; the L2
distance between two such vectors is the one `analysis.dispersion` reports.

`transform` projects every point on its own, so a point lands where it lands
whatever it is projected with (UMAP's batch transform prunes the fuzzy graph
by the batch's largest weight, so batches would move points).
t-SNE has no transform: `transform` fits t-SNE again on the reference plus
the points and returns the points' coordinates; the reference moves too, and
`reference_xy_` is updated to where it lands in that joint fit. `refits`
says which case applies.

Fitted UMAP and PCA models are cached on disk under a key of the data's hash
and the parameters. UMAP's numba code is compiled once per machine and kept in
numba's on-disk cache (`import_umap`), so later processes load it instead of
compiling again; `warm_up()` compiles it ahead of the first map.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import threading
from functools import cache
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from analysis.paths import REPO_ROOT, RUNS_DIR

METHODS = ("umap", "pca", "tsne")
DEFAULT_CACHE_DIR = RUNS_DIR / "projection_cache"


def flatten_embeddings(embeddings: torch.Tensor | np.ndarray, tokens: str | list[int] = "all") -> np.ndarray:
    """Embeddings `[n, 77, d]` -> float64 vectors `[n, len(tokens) * d]` of the chosen token positions."""
    embeddings = torch.as_tensor(embeddings)
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must have shape [n, tokens, d], got {tuple(embeddings.shape)}")
    if tokens != "all":
        positions = [int(p) for p in tokens]
        if not positions or not all(0 <= p < embeddings.shape[1] for p in positions):
            raise ValueError(f"tokens must be 'all' or positions in [0, {embeddings.shape[1]}), got {tokens!r}")
        embeddings = embeddings[:, positions]
    return embeddings.detach().double().flatten(1).cpu().numpy()


class Projection:
    """A 2-D map of embeddings. Hyperparameters here; `fit(reference)` learns the map, `transform` places points.

    `method`: "umap", "pca" or "tsne". `n_neighbors` and `min_dist` are
    UMAP's, `perplexity` t-SNE's; `seed` fixes every random choice.
    `cache_dir` (None: no cache) keeps fitted UMAP and PCA models.

    After `fit`: `reference_xy_` `[n, 2]`.
    """

    def __init__(self, method: str = "umap", tokens: str | list[int] = "all", n_neighbors: int = 15,
                 min_dist: float = 0.1, perplexity: float = 30.0, seed: int = 0,
                 cache_dir: str | Path | None = DEFAULT_CACHE_DIR):
        if method not in METHODS:
            raise ValueError(f"unknown projection method {method!r}; choose one of {METHODS}")
        self.method = method
        self.tokens = tokens
        self.n_neighbors = n_neighbors
        self.min_dist = min_dist
        self.perplexity = perplexity
        self.seed = seed
        self.cache_dir = cache_dir

    @property
    def refits(self) -> bool:
        """True when `transform` fits the map again (t-SNE) and so moves the reference."""
        return self.method == "tsne"

    def fit(self, reference: torch.Tensor | np.ndarray) -> Projection:
        """Learn the map from reference embeddings `[n, 77, d]`; returns self."""
        vectors = flatten_embeddings(reference, self.tokens)
        self._check_size(len(vectors))
        self.reference_ = vectors
        if self.method == "tsne":
            self.reference_xy_ = self._tsne(vectors)
            return self
        if self.method == "umap":
            import_umap()  # before a cached model is unpickled too: its transform runs the same compiled code
        path = self._cache_path(vectors)
        if path is not None and path.is_file():
            # pickle runs code on load: cache_dir must only hold files this class wrote.
            self.model_ = pickle.loads(path.read_bytes())
        else:
            self.model_ = self._new_model().fit(vectors)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                temporary = path.with_name(path.name + ".tmp")
                temporary.write_bytes(pickle.dumps(self.model_))
                temporary.replace(path)
        self.reference_xy_ = self.model_.embedding_ if self.method == "umap" else self.model_.transform(vectors)
        self.reference_xy_ = np.asarray(self.reference_xy_, dtype=np.float64)
        return self

    def transform(self, points: torch.Tensor | np.ndarray) -> np.ndarray:
        """Coordinates `[m, 2]` of embeddings `[m, 77, d]`, each point placed on its own (t-SNE: see the module doc)."""
        if not hasattr(self, "reference_"):
            raise RuntimeError("call fit(reference) before transform")
        vectors = flatten_embeddings(points, self.tokens)
        if vectors.shape[1] != self.reference_.shape[1]:
            raise ValueError(f"points have {vectors.shape[1]} features, the reference {self.reference_.shape[1]}")
        if self.method == "tsne":
            joint = self._tsne(np.concatenate([self.reference_, vectors]))
            self.reference_xy_ = joint[:len(self.reference_)]
            return joint[len(self.reference_):]
        if self.method == "pca":
            return self.model_.transform(vectors).astype(np.float64)
        return np.concatenate([self.model_.transform(vector[None]) for vector in vectors]).astype(np.float64)

    def _check_size(self, n: int) -> None:
        if self.method == "umap" and n <= self.n_neighbors:
            raise ValueError(f"UMAP with n_neighbors={self.n_neighbors} needs more than {self.n_neighbors} "
                             f"reference embeddings, got {n}")
        if self.method == "tsne" and n <= self.perplexity:
            raise ValueError(f"t-SNE with perplexity={self.perplexity} needs more than {self.perplexity} "
                             f"embeddings, got {n}")
        if n < 2:
            raise ValueError(f"a map needs at least 2 reference embeddings, got {n}")

    def _new_model(self):
        if self.method == "pca":
            return PCA(n_components=2, random_state=self.seed)
        return import_umap().UMAP(n_components=2, n_neighbors=self.n_neighbors, min_dist=self.min_dist,
                         random_state=self.seed, transform_seed=self.seed, n_jobs=1)  # a seed makes it serial anyway

    def _tsne(self, vectors: np.ndarray) -> np.ndarray:
        tsne = TSNE(n_components=2, perplexity=self.perplexity, init="pca", random_state=self.seed)
        return tsne.fit_transform(vectors).astype(np.float64)

    def _cache_path(self, vectors: np.ndarray) -> Path | None:
        if self.cache_dir is None:
            return None
        # The library's version is in the key: a model pickled by another version may not load.
        library = "umap-learn" if self.method == "umap" else "scikit-learn"
        parameters = [self.method, self.tokens, self.n_neighbors, self.min_dist, self.seed, version(library)]
        digest = hashlib.sha256(np.ascontiguousarray(vectors).tobytes())
        digest.update(json.dumps(parameters).encode())
        return Path(self.cache_dir) / f"{self.method}-{digest.hexdigest()[:16]}.pkl"


@cache
def import_umap():
    """The `umap` module, with numba's on-disk cache switched on for every compiled function of umap-learn and
    pynndescent that does not ask for it itself.

    Imported on first use: the import alone takes seconds, and PCA and t-SNE do not need it. Without the cache,
    every process compiled the fitting code again before its first map (docs/results/bench_startup.md).
    """
    import numba
    import umap
    from numba.core.caching import NullCache

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("umap", "pynndescent"):
            for function in vars(module).values():
                if isinstance(function, numba.core.registry.CPUDispatcher) and isinstance(function._cache, NullCache):
                    function.enable_caching()
    return umap


def warm_up() -> None:
    """Compile UMAP's numba code (fit and transform) on a tiny input, so that the first real map does not wait."""
    vectors = np.random.default_rng(0).normal(size=(12, 4, 2))
    projection = Projection("umap", n_neighbors=5, cache_dir=None).fit(vectors)
    projection.transform(vectors[:1])


def warm_up_in_background() -> subprocess.Popen:
    """`warm_up()` in a separate, low-priority process: it fills numba's on-disk cache for this process's first map
    without holding this process's interpreter lock (compiling is mostly Python) while the app starts serving."""
    lower_priority = (lambda: os.nice(10)) if os.name == "posix" else None
    process = subprocess.Popen([sys.executable, "-m", "analysis.projection"], cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=lower_priority)
    threading.Thread(target=process.wait, name="umap-warm-up", daemon=True).start()  # reaps it when it ends
    return process


if __name__ == "__main__":
    warm_up()
