"""Training-free improvements: flip TTA, GeM pooling, PCA whitening (stored with the index),
alpha-QE and alpha-DBA, each against its definition on tiny data."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from utils_cv.similarity import boosts, features, model
from utils_cv.similarity.distances import knn, l2_normalize
from utils_cv.similarity.index import SimilarityIndex
from utils_cv.similarity.whitening import PCAWhitening, database_augmentation, query_expansion


@pytest.fixture(scope="module")
def backbone():
    return model.create_backbone()


def _images():
    rng = np.random.default_rng(0)  # square: the resize and centre crop are then mirror-symmetric
    return [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(3)]


def test_flip_model_is_the_mean_over_the_image_and_its_mirror(backbone):
    net, tf = backbone
    images = _images()
    mirrored = [im.transpose(Image.FLIP_LEFT_RIGHT) for im in images]
    x = torch.stack([tf(im) for im in images])
    with torch.no_grad():
        expected = (net(x) + net(torch.flip(x, dims=[3]))) / 2
        got = boosts.flip_model(net)(x)
    torch.testing.assert_close(got, expected)
    a = features.extract_features(boosts.flip_model(net), images, tf, progress=False)
    b = features.extract_features(boosts.flip_model(net), mirrored, tf, progress=False)
    assert np.min(np.sum(a * b, axis=1)) > 0.9999  # an image and its mirror get the same features
    plain = features.extract_features(net, images, tf, progress=False)
    assert np.max(np.abs(plain - a)) > 1e-3  # and they differ from the plain ones


def test_gem_with_p_1_is_average_pooling_and_leaves_the_model_alone(backbone):
    net, tf = backbone
    before = type(net.global_pool)
    x = torch.stack([tf(im) for im in _images()])
    with torch.no_grad():
        torch.testing.assert_close(boosts.gem_model(net, p=1)(x), net(x), rtol=1e-4, atol=1e-5)
        g3 = boosts.gem_model(net, p=3)(x)
    assert type(net.global_pool) is before
    assert g3.shape == net(x).shape and not torch.allclose(g3, net(x))
    fmap = net.forward_features(x)
    torch.testing.assert_close(g3, fmap.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="'p'"):
        boosts.GeM(p=0.5)
    with pytest.raises(ValueError, match="global_pool"):
        boosts.gem_model(torch.nn.Linear(3, 3))


def test_pca_whitening_decorrelates_the_gallery():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8))).astype(np.float32)
    w = PCAWhitening.fit(x, power=0.5, shrinkage=0.0)
    z = (x - w.mean) @ w.projection
    np.testing.assert_allclose(np.cov(z.T), np.eye(8), atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(w(x), axis=1), 1.0, rtol=1e-5)
    assert PCAWhitening.fit(x[:5]).dim == 4  # n - 1 axes at most carry variance
    assert PCAWhitening.fit(x, dim=3).dim == 3
    with pytest.raises(ValueError, match="dimension 5"):
        w(x[:, :5])
    with pytest.raises(ValueError, match="at least 2"):
        PCAWhitening.fit(x[:1])


def test_whitening_fitted_on_a_gallery_round_trips_through_the_index(tmp_path):
    rng = np.random.default_rng(1)
    gallery = rng.normal(size=(300, 24)).astype(np.float32)
    queries = gallery[:20] + 0.05 * rng.normal(size=(20, 24)).astype(np.float32)
    w = PCAWhitening.fit(gallery, dim=12)
    index = SimilarityIndex.build(gallery, [f"g{i}" for i in range(300)], whitening=w)
    assert index.dim == 12 and index.input_dim == 24
    D, ids = index.search(queries, 5)
    D_ref, I_ref = knn(w(queries), w(gallery), 5)  # the definition: both sides whitened
    np.testing.assert_allclose(D, D_ref, rtol=1e-5, atol=1e-6)
    assert (ids == np.array([f"g{i}" for i in I_ref.ravel()], dtype=object).reshape(ids.shape)).all()
    index.save(tmp_path / "idx")
    loaded = SimilarityIndex.load(tmp_path / "idx")
    D2, ids2 = loaded.search(queries, 5)
    assert (ids2 == ids).all() and np.array_equal(D2, D)
    np.testing.assert_array_equal(loaded.whitening.projection, w.projection)
    loaded.add(queries[:1], ["new"])  # raw features in, whitened inside
    assert loaded.search(queries[:1], 1)[1][0, 0] == "new"
    with pytest.raises(ValueError, match="dimension 12 but the index takes dimension 24"):
        loaded.search(w(queries), 1)
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    manifest["whitening"]["input_dim"] = 23
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="whitening"):
        SimilarityIndex.load(tmp_path / "idx")


def test_query_expansion_and_database_augmentation_follow_their_definition():
    rng = np.random.default_rng(2)
    g = l2_normalize(rng.normal(size=(50, 6)))
    q = l2_normalize(rng.normal(size=(4, 6)))
    k, alpha = 3, 3.0
    got = query_expansion(q, g, k=k, alpha=alpha)
    D, I = knn(q, g, k)
    for r in range(len(q)):
        sim = np.clip(g[I[r]] @ q[r], 0, None)
        expected = q[r] + (sim[:, None] ** alpha * g[I[r]]).sum(0)
        np.testing.assert_allclose(got[r], expected / np.linalg.norm(expected), rtol=1e-5, atol=1e-6)
    dba = database_augmentation(g, k=k, alpha=alpha)
    _, I = knn(g, g, k, exclude_self=True)
    sim = np.clip(np.einsum("nd,nkd->nk", g, g[I]), 0, None)
    expected = g + np.einsum("nk,nkd->nd", sim ** alpha, g[I])
    np.testing.assert_allclose(dba, l2_normalize(expected), rtol=1e-5, atol=1e-6)
    assert np.allclose(query_expansion(q, g, k=k, alpha=alpha), got)
    with pytest.raises(ValueError, match="'k'"):
        query_expansion(q, g, k=51)
    with pytest.raises(ValueError, match="'alpha'"):
        database_augmentation(g, alpha=-1)


def test_query_expansion_changes_a_ranking_as_defined():
    # the query lies nearer the wrong item b than the right item a; its first neighbour c sits
    # beside a, so expanding the query with c pulls it to a
    a, b, c = [1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.9, 0.2, 0.45]
    q = [0.8, 0.55, 0.35]
    g = l2_normalize(np.array([a, b, c], dtype=np.float32))
    q = l2_normalize(np.array([q], dtype=np.float32))
    before = knn(q, g[:2], 1)[1][0, 0]
    expanded = query_expansion(q, g, k=1, alpha=1.0)  # its nearest neighbour among a, b, c
    assert knn(q, g, 1)[1][0, 0] == 2  # c
    after = knn(expanded, g[:2], 1)[1][0, 0]
    assert (before, after) == (1, 0)


def test_sharded_index_refuses_indexes_in_different_whitened_spaces():
    from utils_cv.similarity.scale_index import ShardedIndex

    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    w = PCAWhitening.fit(x, dim=8)
    plain = SimilarityIndex.build(x[:30], [f"a{i}" for i in range(30)])
    white = SimilarityIndex.build(x[30:], [f"b{i}" for i in range(30)], whitening=w)
    with pytest.raises(ValueError, match="whitening"):
        ShardedIndex([plain, white])
    both = ShardedIndex([white, SimilarityIndex.build(x[:30], [f"a{i}" for i in range(30)], whitening=w)])
    assert both.dim == 8 and both.search(x[:2], 1)[1][:, 0].tolist() == ["a0", "a1"]
