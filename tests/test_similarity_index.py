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


@pytest.mark.parametrize("backend", ["hnsw", "ivfsq", "ivfpq"])
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
    # nothing is closer than the exact nearest (ivfsq reports distances of its 8-bit codes: within 1 %)
    slack = 0.01 * De[:, 0] if backend == "ivfsq" else 1e-4
    assert (Da[:, 0] >= De[:, 0] - slack).all()
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


@pytest.mark.parametrize("backend", ["exact", "hnsw", "ivfsq", "ivfpq"])
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


@pytest.mark.parametrize("backend", ["exact", "hnsw", "ivfsq", "ivfpq"])
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
    assert names[0] == "exact" and {"hnsw", "ivfsq", "ivfpq"} <= set(names)
    exact = rec["table"][0]
    assert exact["recall@10"] == 1.0
    chosen = next(r for r in rec["table"] if r["backend"] == rec["backend"] and r["params"] == rec["params"])
    assert chosen["recall@10"] >= 0.9
    assert chosen["qps"] == max(r["qps"] for r in rec["table"] if r["recall@10"] >= 0.9)
    only_exact = SimilarityIndex.recommend(x[:500], target_recall=1.0, candidates=[("exact", {})], num_queries=50)
    assert only_exact["backend"] == "exact"


def test_search_parameters_change_without_rebuilding_and_survive_save(data, tmp_path):
    x, q, ids = data
    exact_ids = SimilarityIndex.build(x, ids).search(q, 10)[1]
    idx = SimilarityIndex.build(x, ids, backend="hnsw", M=8, efConstruction=40, efSearch=10)

    def recall():
        return np.mean([len(set(a) & set(e)) / 10 for a, e in zip(idx.search(q, 10)[1], exact_ids)])

    low = recall()
    idx.set_search_params(efSearch=200)
    assert idx.params["efSearch"] == 200
    high = recall()
    assert high >= low + 0.2 and high >= 0.9, (low, high)
    idx.save(tmp_path / "idx")
    again = SimilarityIndex.load(tmp_path / "idx")
    assert again.params["efSearch"] == 200
    assert (again.search(q, 10)[1] == idx.search(q, 10)[1]).all()
    with pytest.raises(ValueError, match="nprobe"):
        idx.set_search_params(nprobe=4)
    with pytest.raises(ValueError, match="'efSearch'"):
        idx.set_search_params(efSearch=0)
    lean = SimilarityIndex.build(x, ids, backend="ivfpq", refine=False, nprobe=1)
    with pytest.raises(ValueError, match="refine=True"):
        lean.set_search_params(k_factor=4)
    lean.set_search_params(nprobe=lean.params["nlist"])  # every cell: only the PQ codes limit recall now
    assert lean.params["nprobe"] == lean.params["nlist"]


def test_path_and_tuple_ids_round_trip(data, tmp_path):
    from pathlib import Path

    x, q, _ = data
    ids = [Path("photos") / f"{i}.jpg" for i in range(50)] + [("clip", i) for i in range(50)] + list(range(50))
    idx = SimilarityIndex.build(x[:150], ids)
    idx.save(tmp_path / "idx")
    again = SimilarityIndex.load(tmp_path / "idx")
    assert (again.search(q, 5)[1] == idx.search(q, 5)[1]).all()
    assert again.search(x[:1], 1)[1][0, 0] == Path("photos/0.jpg")
    assert again.search(x[60:61], 1)[1][0, 0] == ("clip", 10)
    again.remove([Path("photos/0.jpg")])
    assert len(again) == 149


def test_a_failed_save_leaves_the_previous_index_loadable(data, tmp_path):
    x, q, ids = data
    SimilarityIndex.build(x[:100], ids[:100]).save(tmp_path / "idx")
    bad = SimilarityIndex.build(x[:200], [object() for _ in range(200)])  # ids JSON cannot hold
    with pytest.raises(TypeError, match="ids must be"):
        bad.save(tmp_path / "idx")
    assert len(SimilarityIndex.load(tmp_path / "idx")) == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"], "the half-written folder is cleaned up"


KILL_CHILD = """
import sys
import numpy as np
from utils_cv.similarity.index import SimilarityIndex
rng = np.random.default_rng(0)
x = rng.normal(size=(200_000, 64)).astype(np.float32)
big = SimilarityIndex.build(x, range(len(x)))
while True:
    big.save(sys.argv[1])
    print("saved", flush=True)
"""


@pytest.mark.parametrize("fraction", [0.15, 0.5, 0.8, 0.97])
def test_killing_a_process_mid_save_never_loses_the_index(data, tmp_path, fraction):
    """SIGKILL at several points of a save: what is on disk always loads whole (old or new)."""
    from conftest import kill_mid_save

    x, _, ids = data
    target = tmp_path / "idx"
    SimilarityIndex.build(x[:100], ids[:100]).save(target)
    kill_mid_save(KILL_CHILD, [str(target)], fraction)
    loaded = SimilarityIndex.load(target)
    assert len(loaded) == 200_000
    D, _ = loaded.search(np.zeros((1, 64), np.float32), 1)
    assert np.isfinite(D).all()


def test_load_recovers_the_previous_index_when_a_save_died_between_its_renames(data, tmp_path, caplog):
    x, _, ids = data
    SimilarityIndex.build(x[:100], ids[:100]).save(tmp_path / "idx")
    (tmp_path / "idx").rename(tmp_path / ".idx.old")  # the state between save's two renames
    assert len(SimilarityIndex.load(tmp_path / "idx")) == 100
    assert "interrupted save" in caplog.text
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        SimilarityIndex.load(tmp_path / "elsewhere")


def test_clustered_vectors_and_the_recall_speed_sweep(data):
    x = index.clustered_vectors(3000, 16, clusters=20, noise=0.1, seed=3)
    again = index.clustered_vectors(3000, 16, clusters=20, noise=0.1, seed=3)
    q = index.clustered_vectors(100, 16, clusters=20, noise=0.1, seed=3, draw=1)
    assert x.shape == (3000, 16) and x.dtype == np.float32 and (x == again).all()
    assert not np.isin(q, x).all(axis=1).any(), "draw=1 is a new sample"
    # 20 blobs of std 0.1 around centres ~sqrt(2 * 16) apart: each query's neighbour is in its own blob
    _, I = index.knn(q, x, 1)
    assert (np.linalg.norm(q - x[I[:, 0]], axis=1) < 1.0).all()
    ids = list(range(len(x)))
    exact = SimilarityIndex.build(x, ids)
    hnsw = SimilarityIndex.build(x, ids, backend="hnsw", M=4, efConstruction=8)
    rows = index.sweep_search_params(hnsw, q, [{"efSearch": 1}, {"efSearch": 400}], exact=exact)
    assert [r["params"]["efSearch"] for r in rows] == [1, 400] and hnsw.params["efSearch"] == 400
    assert rows[1]["recall@10"] >= rows[0]["recall@10"] and rows[1]["recall@10"] >= 0.9
    assert all(r["qps"] > 0 and r["backend"] == "hnsw" for r in rows)
    truth = exact.search(q, 10)[1]
    assert index.sweep_search_params(exact, q, [{}], truth=truth)[0]["recall@10"] == 1.0
    with pytest.raises(ValueError, match="'truth'"):
        index.sweep_search_params(hnsw, q, [{}])
    with pytest.raises(ValueError, match="'n'"):
        index.clustered_vectors(0, 4)


def test_a_pickle_inside_an_index_is_refused_and_never_run(data, tmp_path):
    """An index folder whose features.npy holds a pickled object (checksums made to match):
    loading refuses it without executing the pickle."""
    import hashlib

    x, _, ids = data
    path = SimilarityIndex.build(x[:50], ids[:50]).save(tmp_path / "idx")
    from conftest import PickleExploit

    marker = tmp_path / "pwned"
    arr = np.empty(1, dtype=object)
    arr[0] = PickleExploit(marker)
    np.save(path / "features.npy", arr, allow_pickle=True)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["sha256"]["features.npy"] = hashlib.sha256((path / "features.npy").read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="features.npy"):
        SimilarityIndex.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(backend="annoy"), "backend 'annoy'"),
    (lambda m: m.update(dim="512"), "dim '512'"),
    (lambda m: m["sha256"].update({"../../etc/passwd": "0" * 64}), "sha256 table"),
    (lambda m: m.update(distance="manhattan"), "distance"),
])
def test_invalid_manifests_are_refused(data, tmp_path, edit, match):
    x, _, ids = data
    path = SimilarityIndex.build(x[:50], ids[:50]).save(tmp_path / "idx")
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=match):
        SimilarityIndex.load(path)
