import numpy as np
import pytest
import torch

from analysis.projection import Projection, flatten_embeddings, import_umap, warm_up_in_background


def clusters(n_per_cluster: int = 10, seed: int = 0) -> torch.Tensor:
    """Two well separated clusters of fake embeddings [2n, 4, 3]."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([0.0, 20.0])
    return torch.cat([centre + torch.randn(n_per_cluster, 4, 3, generator=generator) for centre in centres])


def test_flatten_selects_token_positions():
    embeddings = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    assert flatten_embeddings(embeddings).shape == (2, 6)
    assert np.array_equal(flatten_embeddings(embeddings, [2]), embeddings[:, 2].double().numpy())
    with pytest.raises(ValueError, match="tokens"):
        flatten_embeddings(embeddings, [3])


def test_pca_places_points_one_at_a_time_as_in_a_batch():
    reference = clusters()
    projection = Projection("pca", cache_dir=None).fit(reference)
    together = projection.transform(reference[:5])
    alone = np.concatenate([projection.transform(point[None]) for point in reference[:5]])
    assert np.allclose(together, alone) and np.allclose(together, projection.reference_xy_[:5])
    # The clusters are 20 apart in every entry: the first axis separates them.
    first_axis = projection.reference_xy_[:, 0]
    assert (np.sign(first_axis[:10]) != np.sign(first_axis[10:])[:, None]).all()


class BatchDependentMap:
    """Stands in for umap.UMAP (whose numba compilation alone takes ~30 s of CPU, too long for a unit test).

    Like UMAP's transform, where a point lands depends on the batch it comes in: here it is centred on the batch's mean.
    """

    fits = 0

    def fit(self, vectors):
        BatchDependentMap.fits += 1
        self.embedding_ = vectors[:, :2] * 2
        return self

    def transform(self, vectors):
        return (vectors[:, :2] - vectors[:, :2].mean(axis=0)) * 2


def test_umap_path_places_each_point_on_its_own_and_caches_the_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(Projection, "_new_model", lambda self: BatchDependentMap())
    reference = clusters()
    BatchDependentMap.fits = 0
    projection = Projection("umap", n_neighbors=5, cache_dir=tmp_path).fit(reference)
    assert np.array_equal(projection.reference_xy_, flatten_embeddings(reference)[:, :2] * 2)
    points = reference[[0, 15]] + 0.5
    together = projection.transform(points)
    alone = np.concatenate([projection.transform(point[None]) for point in points])
    assert np.array_equal(together, alone)
    assert np.allclose(together, 0)  # each point is its own batch, so centred on itself

    reloaded = Projection("umap", n_neighbors=5, cache_dir=tmp_path).fit(reference)
    assert BatchDependentMap.fits == 1 and np.array_equal(reloaded.reference_xy_, projection.reference_xy_)
    Projection("umap", n_neighbors=6, cache_dir=tmp_path).fit(reference)  # other parameters: another entry
    Projection("umap", n_neighbors=5, cache_dir=tmp_path).fit(reference + 1)  # other data: another entry
    assert BatchDependentMap.fits == 3 and len(list(tmp_path.glob("umap-*.pkl"))) == 3


def test_tsne_refits_with_the_points_and_moves_the_reference():
    reference = clusters()
    projection = Projection("tsne", perplexity=5).fit(reference)
    assert projection.refits and projection.reference_xy_.shape == (20, 2)
    xy = projection.transform(reference[[0]] + 0.01)
    assert xy.shape == (1, 2) and projection.reference_xy_.shape == (20, 2)
    nearest = np.linalg.norm(projection.reference_xy_ - xy, axis=1).argmin()
    assert nearest < 10  # lands in its own cluster


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="method"):
        Projection("mds")
    with pytest.raises(ValueError, match="n_neighbors=15"):
        Projection("umap", cache_dir=None).fit(clusters(5))
    projection = Projection("pca", cache_dir=None).fit(clusters())
    with pytest.raises(ValueError, match="features"):
        projection.transform(torch.zeros(1, 4, 2))


def test_umap_compiled_code_is_kept_on_disk():
    # Every process would otherwise compile UMAP's fitting code again before its first map.
    from numba.core.caching import NullCache

    umap = import_umap()
    assert not isinstance(umap.utils.fast_knn_indices._cache, NullCache)
    assert not isinstance(umap.umap_.smooth_knn_dist._cache, NullCache)


def test_the_background_warm_up_process_compiles_and_exits():
    assert warm_up_in_background().wait(timeout=600) == 0
