import json

import numpy as np
import pytest

from utils_cv.similarity import index
from utils_cv.similarity.index import SimilarityIndex


def _clustered(n, d, seed=0, centers=50):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d)).astype(np.float32)
    return (c[rng.integers(0, centers, n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    x = _clustered(6000, 32)
    q = _clustered(200, 32, seed=1)
    return x, q, [f"img_{i}.jpg" for i in range(len(x))]


@pytest.mark.parametrize("backend", ["hnsw", "ivfpq"])
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_default_parameters_reach_recall_09_against_exact(data, backend, distance):
    x, q, ids = data
    exact = SimilarityIndex.build(x, ids, backend="exact", distance=distance)
    approx = SimilarityIndex.build(x, ids, backend=backend, distance=distance)
    De, Ie = exact.search(q, 10)
    Da, Ia = approx.search(q, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(Ia, Ie)])
    assert recall >= 0.9, recall
    assert Ia.dtype == object and Ia[0, 0].startswith("img_")
    assert (np.diff(Da, axis=1) >= -1e-5).all()
    assert (Da[:, 0] >= De[:, 0] - 1e-4).all(), "nothing is closer than the exact nearest"
    if backend == "hnsw":  # exact distances: where it finds the true nearest, the distance is the same
        same = Ia[:, 0] == Ie[:, 0]
        assert same.mean() >= 0.9
        np.testing.assert_allclose(Da[same, 0], De[same, 0], atol=1e-4)


def test_exact_backend_matches_knn(data):
    x, q, ids = data
    idx = SimilarityIndex.build(x, ids)
    D, I = idx.search(q, 5)
    Dk, Ik = index.knn(q, x, 5)
    np.testing.assert_allclose(D, Dk, atol=1e-6)
    assert I.tolist() == [[ids[j] for j in row] for row in Ik]


@pytest.mark.parametrize("backend", ["exact", "hnsw", "ivfpq"])
def test_add_and_remove(data, backend):
    x, q, ids = data
    idx = SimilarityIndex.build(x[:5000], ids[:5000], backend=backend)
    assert len(idx) == 5000
    D, I = idx.search(q[:20], 3)
    gone = set(I[:, 0])
    assert idx.remove(gone) == len(gone)
    assert len(idx) == 5000 - len(gone)
    D2, I2 = idx.search(q[:20], 3)
    assert not gone & set(I2.ravel())
    idx.add(x[5000:5010], ids[5000:5010])
    D3, I3 = idx.search(x[5000:5010], 1)
    assert I3[:, 0].tolist() == ids[5000:5010]
    with pytest.raises(ValueError, match="already in the index"):
        idx.add(x[:1], ids[1:2])
    with pytest.raises(KeyError):
        idx.remove(["nope"])


@pytest.mark.parametrize("backend", ["exact", "hnsw", "ivfpq"])
def test_save_load_round_trip_and_refusals(data, tmp_path, backend):
    x, q, ids = data
    idx = SimilarityIndex.build(x, ids, backend=backend, metadata={"backbone": "efficientnet_lite0"})
    idx.remove(ids[:5])
    path = idx.save(tmp_path / "idx")
    loaded = SimilarityIndex.load(path, backbone="efficientnet_lite0")
    D1, I1 = idx.search(q, 5)
    D2, I2 = loaded.search(q, 5)
    np.testing.assert_allclose(D1, D2, atol=1e-6)
    assert I1.tolist() == I2.tolist() and len(loaded) == len(idx)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["backend"] == backend and manifest["dim"] == 32 and "versions" in manifest
    with pytest.raises(ValueError, match="backbone"):
        SimilarityIndex.load(path, backbone="resnet50")
    with pytest.raises(ValueError, match="dimension"):
        loaded.search(q[:, :16], 5)
    data_file = next(f for f in ("features.npy", "index.faiss") if (path / f).exists())
    blob = bytearray((path / data_file).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (path / data_file).write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="corrupted"):
        SimilarityIndex.load(path)


def test_saving_over_an_index_replaces_it_whole(data, tmp_path):
    x, q, ids = data
    SimilarityIndex.build(x[:100], ids[:100]).save(tmp_path / "idx")
    SimilarityIndex.build(x[:200], ids[:200]).save(tmp_path / "idx")
    assert len(SimilarityIndex.load(tmp_path / "idx")) == 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_bad_arguments(data):
    x, q, ids = data
    with pytest.raises(ValueError, match="'backend'"):
        SimilarityIndex.build(x, ids, backend="annoy")
    with pytest.raises(ValueError, match="Unknown parameters"):
        SimilarityIndex.build(x, ids, backend="hnsw", nprobe=3)
    with pytest.raises(ValueError, match="duplicates"):
        SimilarityIndex.build(x[:2], ["a", "a"])
    with pytest.raises(ValueError, match="at least"):
        SimilarityIndex.build(x[:100], ids[:100], backend="ivfpq")
    idx = SimilarityIndex.build(x[:10], ids[:10])
    with pytest.raises(ValueError, match="larger than"):
        idx.search(q, 11)


def test_recommend_measures_every_candidate_and_picks_a_fast_one_that_reaches_the_target(data):
    x, _, _ = data
    rec = SimilarityIndex.recommend(x, target_recall=0.9, num_queries=200)
    names = [r["backend"] for r in rec["table"]]
    assert names[0] == "exact" and {"hnsw", "ivfpq"} <= set(names)
    exact = rec["table"][0]
    assert exact["recall@10"] == 1.0
    chosen = next(r for r in rec["table"] if r["backend"] == rec["backend"] and r["params"] == rec["params"])
    assert chosen["recall@10"] >= 0.9
    assert chosen["qps"] == max(r["qps"] for r in rec["table"] if r["recall@10"] >= 0.9)
    only_exact = SimilarityIndex.recommend(x[:500], target_recall=1.0, candidates=[("exact", {})], num_queries=50)
    assert only_exact["backend"] == "exact"
