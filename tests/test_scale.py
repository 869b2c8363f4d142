"""Scale-out: parquet shards, shard-by-shard index builds (no Ray needed) and Ray Data
embedding in Ray's local mode (one module-scoped 2-CPU session; skipped without ray)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import draw_image_folder
from utils_cv.similarity import scale, scale_io
from utils_cv.similarity.index import SimilarityIndex
from utils_cv.similarity.scale_index import ShardedIndex, build_index

pa = pytest.importorskip("pyarrow")


def _write_shards(folder: Path, x: np.ndarray, paths: list[str], size: int, failed=()) -> Path:
    """Shards as scale.embed writes them; rows named in ``failed`` carry an error."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(x), size):
        parts = [{"path": np.array(paths[s:s + size], dtype=object), "pos": np.arange(len(x[s:s + size])),
                  "embedding": x[s:s + size],
                  "error": np.array(["broken" if p in failed else "" for p in paths[s:s + size]], dtype=object)}]
        scale_io.write_shard(str(folder), f"part-{s // size:05d}-test.parquet",
                             scale_io.shard_table(parts, "synthetic", {"backbone": "synthetic"}, x.shape[1]))
    return folder


def _clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(40, d)).astype(np.float32)
    return (centers[rng.integers(0, 40, n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)


# ---------------------------------------------------------------------------- no Ray
@pytest.mark.parametrize("backend", ["ivfsq", "ivfpq"])
def test_shard_built_index_answers_as_the_in_memory_build(tmp_path, backend):
    pytest.importorskip("faiss")
    x = _clustered(3000, 32)
    paths = [f"photos/{i:05d}.jpg" for i in range(len(x))]
    shards = _write_shards(tmp_path / "shards", x, paths, size=400)
    # nlist=16: the in-memory build trains on 64 * 16 = 1024 of the 3000 rows, so the sample matters
    built = build_index(shards, tmp_path / "index", backend=backend, nlist=16, progress=False)
    reference = SimilarityIndex.build(x, paths, backend=backend, nlist=16)
    loaded = SimilarityIndex.load(tmp_path / "index")
    assert len(loaded) == len(built) == len(x)
    q = x[::25] + 0.01
    D, ids = loaded.search(q, 10)
    D_ref, ids_ref = reference.search(q, 10)
    assert (ids == ids_ref).all()
    np.testing.assert_allclose(D, D_ref, rtol=1e-5, atol=1e-5)
    other = build_index(shards, backend=backend, nlist=16, seed=1, progress=False)  # another sample, same quality
    assert (other.search(q, 1)[1][:, 0] == ids_ref[:, 0]).mean() > 0.9


def test_rows_with_errors_stay_out_of_the_index_and_are_listed(tmp_path):
    x = _clustered(30, 8)
    paths = [f"{i}.jpg" for i in range(30)]
    shards = _write_shards(tmp_path / "shards", x, paths, size=7, failed={"3.jpg", "20.jpg"})
    index = build_index(shards, backend="exact", progress=False)
    assert len(index) == 28
    got_paths, feats, errors = scale_io.load_embeddings(shards)
    assert [p for p, _ in errors] == ["3.jpg", "20.jpg"] and "3.jpg" not in got_paths
    np.testing.assert_array_equal(feats, np.delete(x, [3, 20], axis=0))
    assert index.search(x[5:6], 1)[1][0, 0] == "5.jpg"


def test_sharded_index_merges_answers_by_distance():
    x = _clustered(500, 16)
    ids = [f"id{i}" for i in range(500)]
    parts = ShardedIndex([SimilarityIndex.build(x[:200], ids[:200]), SimilarityIndex.build(x[200:], ids[200:])])
    D, got = parts.search(x[::50], 7)
    D_ref, ref = SimilarityIndex.build(x, ids).search(x[::50], 7)
    assert len(parts) == 500 and (got == ref).all()
    np.testing.assert_allclose(D, D_ref, rtol=1e-6)
    with pytest.raises(ValueError, match="'k'"):
        parts.search(x[:1], 501)


def test_sources_are_listed_in_a_stable_order(tmp_path, image_folder):
    from_folder = [p for p, _ in scale_io.list_source(image_folder)]
    assert len(from_folder) == 12 and from_folder == sorted(from_folder)
    assert [p for p, _ in scale_io.list_source(str(image_folder / "**" / "*.jpg"))] == from_folder
    table = tmp_path / "list.csv"
    rel = [os.path.relpath(p, tmp_path) for p in from_folder[::-1]]
    table.write_text("path\n" + "\n".join(rel) + "\n")
    assert [p for p, _ in scale_io.list_source(table)] == from_folder[::-1]  # file order, paths from its folder
    pa.parquet.write_table(pa.table({"path": from_folder[:3]}), tmp_path / "list.parquet")
    assert [p for p, _ in scale_io.list_source(tmp_path / "list.parquet")] == from_folder[:3]
    with pytest.raises(ValueError, match="twice"):
        scale_io.list_source([from_folder[0], from_folder[0]])


def test_bad_arguments_fail_before_any_work(tmp_path, image_folder):
    from utils_cv.similarity import model

    with pytest.raises(ValueError, match="'shard_size'"):
        scale.embed(image_folder, tmp_path / "out", shard_size=0)
    with pytest.raises(ValueError, match="'decode'"):
        scale.embed(image_folder, tmp_path / "out", decode="gpu")
    net, _ = model.create_backbone(pretrained=False, image_size=32)
    with pytest.raises(ValueError, match="transform="):
        scale.embed(image_folder, tmp_path / "out", model=net)
    with pytest.raises(ValueError, match="'backend'"):
        build_index(tmp_path, backend="annoy")
    with pytest.raises(FileNotFoundError, match="scale.embed"):
        build_index(tmp_path / "missing")


# ---------------------------------------------------------------------------- Ray local mode
@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _default_subset(root: Path, n: int) -> Path:
    from utils_cv.similarity import data

    paths, _ = data.list_images(data.default_dataset())
    for p in paths[:: len(paths) // n][:n]:
        dest = root / p.parent.name / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)
    return root


def test_ray_collection_equals_feature_extractor_and_lists_bad_files(ray_local, tmp_path):
    from utils_cv.similarity import collection, model
    from utils_cv.similarity.features import FeatureExtractor

    root = _default_subset(tmp_path / "images", 12)
    (root / "not_an_image.jpg").write_bytes(b"plain text, not a JPEG")
    good = next(root.rglob("*.jpg"))
    (root / "truncated.jpg").write_bytes(good.read_bytes()[:200])
    out = tmp_path / "collection"
    report = scale.index_folder_ray(root, out, shard_size=5, batch_size=4, progress=False)
    assert sorted(Path(p).name for p, _ in report.skipped) == ["not_an_image.jpg", "truncated.jpg"]
    assert report.total == 12
    paths, feats, errors = scale_io.load_embeddings(out / "shards")
    assert len(paths) == 12 and len(errors) == 2 and all("Could not decode" in e for _, e in errors)
    net, transform = model.create_backbone()
    ref = FeatureExtractor(net, transform).extract([Path(p) for p in paths], progress=False).features
    assert np.min(np.sum(ref * feats, axis=1)) >= 0.9999  # rows joined on path (same order)
    shard = pa.parquet.read_table(scale_io.list_shards(out / "shards")[0])
    assert shard.column_names == ["path", "embedding", "model", "error"]
    assert set(shard.column("model").to_pylist()) == {"efficientnet_lite0"}
    # decode tasks feeding the model actors (the GPU layout): the same rows and errors
    tasks = scale.embed(root, tmp_path / "tasks", decode="tasks", shard_size=5, batch_size=4, progress=False)
    t_paths, t_feats, t_errors = scale_io.load_embeddings(tasks.shards)
    assert t_paths == paths and sorted(p for p, _ in t_errors) == sorted(p for p, _ in errors)
    assert np.min(np.sum(t_feats * feats, axis=1)) >= 0.9999
    col = collection.open_collection(out)  # what `query` opens
    _, ids = col.index.search(col.features[:3], 1)
    assert list(ids[:, 0]) == [e["path"] for e in col.entries[:3]]
    assert {Path(p).name for p, _ in col.skipped} == {"not_an_image.jpg", "truncated.jpg"}


_RUN = textwrap.dedent("""
    import sys, time, torch, ray
    from torch import nn
    from utils_cv.similarity import model, scale

    class Slow(nn.Module):  # a real backbone that takes 0.3 s a batch, so a kill lands mid-run
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body, _ = model.create_backbone(pretrained=False, image_size=32)
        def forward(self, x):
            time.sleep(0.3)
            return self.body(x)

    ray.init(address=sys.argv[3], log_to_driver=False)
    _, tf = model.create_backbone(pretrained=False, image_size=32)
    scale.embed(sys.argv[1], sys.argv[2], model=Slow(), transform=tf, batch_size=2, shard_size=2, concurrency=1,
                progress=False)
    print("done", flush=True)
""")


def test_a_killed_run_resumes_without_duplicates(ray_local, tmp_path):
    root = draw_image_folder(tmp_path / "images", per_class=4)  # 12 images: 6 shards of 2
    out = tmp_path / "shards"
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, "-c", _RUN, str(root), str(out), address]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # Ray's start and the model load take minutes on a loaded machine
        while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
        killed_late = child.poll() is not None
        os.killpg(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 1 <= len(first) < 6, (f"the kill should land mid-run; {len(first)} of 6 shards were written (the run "
                                 f"{'had exited' if killed_late else 'was killed'})")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "done", done.stderr[-2000:]
    final = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert len(final) == 6 and all(final[n] == t for n, t in first.items())  # complete shards were skipped
    assert not list(out.glob(".*.tmp"))
    paths, feats, errors = scale_io.load_embeddings(out)
    assert sorted(paths) == sorted(str(p) for p in root.rglob("*.jpg")) and len(set(paths)) == 12 and not errors
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
