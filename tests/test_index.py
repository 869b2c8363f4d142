"""SimilarityIndex: search, add / remove, save / load, and
what a load, a save and concurrent processes may expect from a folder on disk."""
import hashlib
import json
import os
import time

import numpy as np
import pytest

from utils_cv.similarity import distances, index
from utils_cv.similarity.index import SimilarityIndex

def _visible(folder):
    """Entries of ``folder`` except the lock files that guard concurrent saves and loads."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


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
    assert _visible(tmp_path) == ["idx"]


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
    assert _visible(tmp_path) == ["idx"], "the half-written folder is cleaned up"


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


# ---------------------------------------------------------------------------- backends as faiss factory strings
def test_factory_backends_build_the_same_faiss_structures_as_the_hand_built_ones(data):
    """The table entries give byte-identical indexes to the faiss classes built by hand (same
    training sample, same seeds): results cannot have moved."""
    faiss = pytest.importorskip("faiss")
    x, ids = data[0][:1000, :16].copy(), data[2][:1000]
    (n, d), nlist = x.shape, 4  # more than 64 vectors per cell: training takes the seeded sample
    sample = x[np.sort(np.random.default_rng(0).choice(n, 64 * nlist, replace=False))]
    hnsw = faiss.IndexHNSWFlat(d, 32)
    hnsw.hnsw.efConstruction, hnsw.hnsw.efSearch = 200, 128
    sq = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(d), d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_L2)
    pq = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, nlist, 4, 8)
    for ivf in (sq, pq):
        ivf.nprobe = 8
        ivf.train(sample)
    pq = faiss.IndexRefineFlat(pq)
    pq.k_factor = 32.0
    for backend, by_hand in (("hnsw", hnsw), ("ivfsq", sq), ("ivfpq", pq)):
        by_hand.add(x)
        built = SimilarityIndex.build(x, ids, backend=backend, **({} if backend == "hnsw" else {"nlist": nlist}))
        assert faiss.serialize_index(built._faiss).tobytes() == faiss.serialize_index(by_hand).tobytes(), backend


# ---------------------------------------------------------------------------- issue 13.3: save never destroys
@pytest.mark.parametrize("kind", ["folder", "file", "symlink"])
def test_save_refuses_a_path_that_is_not_an_index_before_changing_anything(data, tmp_path, kind):
    x, _, ids = data
    photos = tmp_path / "my_photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"precious")
    target = {"folder": photos, "file": photos / "holiday.jpg", "symlink": tmp_path / "link"}[kind]
    if kind == "symlink":
        target.symlink_to(photos)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(FileExistsError, match=str(target.name)):
        SimilarityIndex.build(x[:20], ids[:20]).save(target)
    assert (photos / "holiday.jpg").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing was written beside it either"


def test_save_refuses_an_index_folder_holding_other_files_and_accepts_an_empty_folder(data, tmp_path):
    x, _, ids = data
    path = SimilarityIndex.build(x[:20], ids[:20]).save(tmp_path / "idx")
    (path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="other files"):
        SimilarityIndex.build(x[:30], ids[:30]).save(path)
    assert (path / "notes.txt").read_text() == "mine" and len(SimilarityIndex.load(path)) == 20
    (tmp_path / "empty").mkdir()
    assert len(SimilarityIndex.load(SimilarityIndex.build(x[:30], ids[:30]).save(tmp_path / "empty"))) == 30


# ---------------------------------------------------------------------------- issue 13.4: concurrent processes
N_A, N_B = 3000, 2000


def _two_indexes():
    rng = np.random.default_rng(5)
    a = SimilarityIndex.build(rng.normal(size=(N_A, 32)).astype(np.float32), [f"a{i}" for i in range(N_A)])
    b = SimilarityIndex.build(rng.normal(size=(N_B, 32)).astype(np.float32), [f"b{i}" for i in range(N_B)])
    return a, b


def _writer(path, saves, results):
    a, b = _two_indexes()
    errors = []
    for i in range(saves):
        try:
            (a if i % 2 == 0 else b).save(path)
        except Exception as exc:  # reported to the test, which fails on any
            errors.append(repr(exc))
    results.put(("writer", saves, errors))


def _reader(path, seconds, results):
    a, b = _two_indexes()
    queries = np.vstack([a._features[7], b._features[7]])
    loads, errors, torn = 0, [], 0
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        try:
            idx = SimilarityIndex.load(path)
        except Exception as exc:
            errors.append(repr(exc))
            continue
        loads += 1
        D, I = idx.search(queries, 1)
        whole_a = len(idx) == N_A and I[0, 0] == "a7" and D[0, 0] < 1e-3
        whole_b = len(idx) == N_B and I[1, 0] == "b7" and D[1, 0] < 1e-3
        torn += whole_a == whole_b  # neither (or both): ids of one save with features of another
    results.put(("reader", loads, errors + [f"{torn} torn loads"] * bool(torn)))


def test_concurrent_saves_and_loads_in_real_processes_never_tear_or_fail(tmp_path):
    """Two writers save two different indexes alternately at one path while two readers load it
    over and over: every load is one whole save, and no writer or reader raises."""
    import multiprocessing

    path = tmp_path / "idx"
    _two_indexes()[0].save(path)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, 24, results)) for _ in range(2)]
    procs += [ctx.Process(target=_reader, args=(path, 6.0, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert all(p.exitcode == 0 for p in procs)
    assert [errors for _, _, errors in got] == [[]] * 4
    assert sum(n for role, n, _ in got if role == "reader") >= 10, "the readers did load while saves ran"
    assert _visible(tmp_path) == ["idx"], "no temporary or old folder is left behind"
    assert len(SimilarityIndex.load(path)) == N_B  # each writer's last save is b


# ---------------------------------------------------------------------------- issue 13.7: k answers, never None
@pytest.mark.parametrize("backend,params", [("ivfsq", {"nprobe": 1}), ("ivfsq", {"nprobe": 1, "refine": True}),
                                            ("ivfpq", {"nprobe": 1, "refine": False}),
                                            ("hnsw", {"M": 4, "efConstruction": 8, "efSearch": 4})])
def test_approximate_search_returns_k_real_answers_even_when_k_is_close_to_n(backend, params):
    x = index_tuning_vectors(4000)
    idx = SimilarityIndex.build(x, list(range(len(x))), backend=backend, **params)
    q = x[:30] + 0.01
    D, I = idx.search(q, 1000)
    assert not (I == None).any() and np.isfinite(D).all()  # noqa: E711 - object array
    assert all(len(set(row)) == 1000 for row in I.tolist())
    assert (np.diff(D, axis=1) >= -1e-4).all()
    idx.remove(range(0, 4000, 2))  # every second item gone: exactly k = n live ones remain
    D, I = idx.search(q[:3], 2000)
    assert sorted(I[0].tolist()) == list(range(1, 4000, 2)) and np.isfinite(D).all()
    assert idx.params == {**idx.params, **params}, "the index's own search settings are left as they were"


def index_tuning_vectors(n):
    from utils_cv.similarity.index_tuning import clustered_vectors

    return clustered_vectors(n, 16, clusters=40, noise=0.3, seed=9)


# ---------------------------------------------------------------------------- issue 13.11: load checks everything
def _rehash(path):
    manifest = json.loads((path / "manifest.json").read_text())
    for name in manifest["sha256"]:
        manifest["sha256"][name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))


def _edit_json(name, edit):
    def apply(path):
        doc = json.loads((path / name).read_text())
        edit(doc)
        (path / name).write_text(json.dumps(doc))
    return apply


def _nested_ids(path):
    (path / "ids.json").write_text('{"ids": [' + "[" * 100_000 + "]" * 100_000 + '], "removed": []}')


def _huge_npy_header(path):
    blob = (path / "features.npy").read_bytes()
    header = blob[:128].replace(b"(20, 8)", b"(2000000000000, 8)")  # claims 64 TB
    (path / "features.npy").write_bytes(header + blob[128:])


def _nan_features(path):
    feats = np.load(path / "features.npy")
    feats[3, 2] = np.nan
    np.save(path / "features.npy", feats)


@pytest.mark.parametrize("backend,edit,match", [
    ("hnsw", _edit_json("manifest.json", lambda m: m["params"].update(efSearch=-5)), "params.efSearch"),
    ("hnsw", _edit_json("manifest.json", lambda m: m["params"].update(efSearch=1e30)), "params.efSearch"),
    ("hnsw", _edit_json("manifest.json", lambda m: m["params"].pop("efSearch")), "params has keys"),
    ("exact", _edit_json("manifest.json", lambda m: m.pop("dim")), "'dim' is missing"),
    ("exact", _edit_json("manifest.json", lambda m: m.update(count=19)), "'count'"),
    ("exact", _edit_json("ids.json", lambda d: d.update(removed=[25])), "ids.json.*'removed'"),
    ("exact", _edit_json("ids.json", lambda d: d.update(removed="12")), "ids.json.*'removed'"),
    ("exact", _edit_json("ids.json", lambda d: d.update(removed=[1, 1])), "ids.json.*'removed'"),
    ("exact", _edit_json("ids.json", lambda d: d["ids"].__setitem__(1, d["ids"][0])), "ids.json.*same id twice"),
    ("exact", _nested_ids, "ids.json.*nest"),
    ("exact", _huge_npy_header, "features.npy.*float32 \\(20, 8\\)"),
    ("exact", _nan_features, "features.npy.*NaN"),
])
def test_hand_edited_index_files_are_refused_naming_the_file_and_field(tmp_path, backend, edit, match):
    x = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    path = SimilarityIndex.build(x, [f"i{j}" for j in range(20)], backend=backend, M=4).save(tmp_path / "idx") \
        if backend == "hnsw" else SimilarityIndex.build(x, [f"i{j}" for j in range(20)]).save(tmp_path / "idx")
    edit(path)
    _rehash(path)  # checksums made to match: the content checks themselves must refuse
    with pytest.raises(ValueError, match=match):
        SimilarityIndex.load(path)


# ---------------------------------------------------------------------------- issue 13.13: prepared exact search
@pytest.mark.parametrize("torch_path", [False, True])
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_exact_search_in_place_gives_the_answers_of_knn_ties_included(monkeypatch, torch_path, distance):
    if torch_path:
        monkeypatch.setattr(index.backends, "faiss_module", lambda: None)  # the path taken without faiss
    rng = np.random.default_rng(3)
    x = np.repeat(rng.normal(size=(40, 6)).astype(np.float32), 5, axis=0)  # every row 5 times: ties
    idx = SimilarityIndex.build(x[:120], list(range(120)), distance=distance)
    q = np.vstack([x[::7], rng.normal(size=(5, 6)).astype(np.float32)])
    for step in range(2):  # before and after an add: cached norms follow the new rows
        if step:
            idx.add(x[120:], list(range(120, 200)))
        D, I = idx.search(q, 12)
        Dk, Ik = index.knn(q, x[:len(idx)], 12, distance=distance, backend="torch" if torch_path else "faiss")
        assert I.tolist() == Ik.tolist()
        np.testing.assert_allclose(D, Dk, atol=1e-6)


def test_add_grows_the_buffer_geometrically_instead_of_copying_everything_each_time(data):
    x, _, ids = data
    idx = SimilarityIndex.build(x[:1000], ids[:1000])
    buffers = set()
    for j in range(1000, 1300):
        idx.add(x[j:j + 1], ids[j:j + 1])
        buffers.add(idx._features.__array_interface__["data"][0])
    assert len(buffers) <= 2, f"{len(buffers)} reallocations for 300 single-row adds"
    np.testing.assert_array_equal(idx._features, x[:1300])
    assert idx.search(x[1299:1300], 1)[1][0, 0] == ids[1299]


RSS_CHILD = """
import sys
import faiss
import numpy as np
from utils_cv.similarity.index import SimilarityIndex

def peak_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

idx = SimilarityIndex.load(sys.argv[1])
q = np.random.default_rng(1).normal(size=(1, 64)).astype(np.float32)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident size to the current one
before = peak_kb()
for _ in range(3):
    idx.search(q, 5)
print(peak_kb() - before)
"""


def test_one_query_exact_search_of_a_loaded_index_does_not_copy_the_gallery(tmp_path):
    """200k x 64 (51 MB): a one-query search must not allocate another copy of the vectors."""
    import subprocess
    import sys

    pytest.importorskip("faiss")
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux' /proc/self/clear_refs to measure peak memory")
    x = np.random.default_rng(0).normal(size=(200_000, 64)).astype(np.float32)
    SimilarityIndex.build(x, range(len(x))).save(tmp_path / "idx")
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(tmp_path / "idx")], capture_output=True, text=True,
                         check=True)
    grown_mb = int(out.stdout.split()[-1]) / 1024
    assert grown_mb < 0.3 * x.nbytes / 2**20, f"peak memory grew {grown_mb:.0f} MB for one-query searches"


# ---------------------------------------------------------------------------- issue 13.14 (index parts)
def test_removing_the_same_id_twice_is_refused_before_anything_is_removed(data):
    x, _, ids = data
    idx = SimilarityIndex.build(x[:10], ids[:10])
    with pytest.raises(ValueError, match="twice"):
        idx.remove([ids[0], ids[0]])
    assert len(idx) == 10 and idx.search(x[:1], 1)[1][0, 0] == ids[0]


def test_index_folders_get_the_usual_permissions(data, tmp_path):
    x, _, ids = data
    umask = os.umask(0o022)
    os.umask(umask)
    path = SimilarityIndex.build(x[:10], ids[:10]).save(tmp_path / "idx")
    assert os.stat(path).st_mode & 0o777 == 0o777 & ~umask
    assert os.stat(path / "manifest.json").st_mode & 0o777 == 0o666 & ~umask


def test_features_without_columns_are_refused(data):
    with pytest.raises(ValueError, match="'features'.*0 columns"):
        SimilarityIndex.build(np.zeros((5, 0), np.float32), range(5))
