"""Scale-out costs: Ray Data embedding vs one process, shard-by-shard index build vs in memory.

    .venv/bin/python benchmarks/bench_scale.py [--images 192] [--repeats 2] [--n 1000000] [--d 512]
    .venv/bin/python benchmarks/bench_scale.py --skip-index      # throughput only
    .venv/bin/python benchmarks/bench_scale.py --skip-embed --n 200000

1. Images per second on ``--images`` images of the default data set (efficientnet_lite0 at
   224 px): ``features.extract_features`` in this process vs ``scale.embed`` on Ray's local
   mode (``ray.init(num_cpus=os.cpu_count())``, started once, not timed). "total" is one
   ``embed`` call on all the images, starting its model actor included; "marginal" is what each
   image beyond the first 32 costs, (n - 32) / (time for n - time for 32): the rate a long job
   sees once its actors are up. Goal: marginal Ray rate >= 0.8 x the single-process rate
   (overhead under 20 %).
2. Peak memory of an IVF-SQ8 index built from ``--n`` x ``--d`` clustered vectors (seeded,
   as bench_index.py) stored as parquet shards of 50,000 rows: ``scale_index.build_index``
   (sample, then one shard at a time) vs loading every vector and ``SimilarityIndex.build``.
   Each build runs in its own child process; peak memory is the child's maximum resident size.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def embed_rates(n_images: int, repeats: int, batch_size: int) -> None:
    import ray

    from utils_cv.similarity import data, features, model, scale

    paths, _ = data.list_images(data.default_dataset())
    paths = paths[:: max(1, len(paths) // n_images)][:n_images]
    net, transform = model.create_backbone()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    single, total, steady = [], [], []
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        for r in range(repeats):
            t = time.perf_counter()
            features.extract_features(net, paths, transform, batch_size=batch_size, progress=False)
            single.append(len(paths) / (time.perf_counter() - t))
            t = time.perf_counter()
            scale.embed([str(p) for p in paths[:32]], tmp / f"small{r}", batch_size=batch_size, progress=False)
            small = time.perf_counter() - t
            t = time.perf_counter()
            scale.embed([str(p) for p in paths], tmp / f"run{r}", batch_size=batch_size, progress=False)
            full = time.perf_counter() - t
            total.append(len(paths) / full)
            steady.append((len(paths) - 32) / max(full - small, 1e-9))
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(paths)} images of the default data set, efficientnet_lite0 at 224 px, batch {batch_size}, "
          f"{os.cpu_count()} CPUs, best of {repeats}\n")
    print("| method | img/s |\n|---|---:|")
    print(f"| extract_features, one process | {max(single):.1f} |")
    print(f"| scale.embed, Ray local mode, total (actor start included) | {max(total):.1f} |")
    print(f"| scale.embed, Ray local mode, marginal (beyond the first 32 images) | {max(steady):.1f} |")
    print(f"\nRay marginal / one process = {max(steady) / max(single):.2f} (goal >= 0.80); "
          f"total / one process = {max(total) / max(single):.2f}\n")


def write_shards(folder: Path, n: int, d: int, rows: int = 50_000) -> None:
    from utils_cv.similarity import scale_io

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, d)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, n, rows):
        m = min(rows, n - s)
        x = centres[rng.integers(0, 1000, m)] + 0.5 * rng.standard_normal((m, d)).astype(np.float32)
        part = {"path": np.array([f"img/{i:08d}.jpg" for i in range(s, s + m)], dtype=object),
                "pos": np.arange(m), "embedding": x, "error": np.array([""] * m, dtype=object)}
        scale_io.write_shard(str(folder), f"part-{s // rows:05d}.parquet",
                             scale_io.shard_table([part], "synthetic", {"backbone": "synthetic"}, d))


_CHILD = """
import json, resource, sys, time
from utils_cv.similarity import scale_index, scale_io
from utils_cv.similarity.index import SimilarityIndex
t = time.perf_counter()
if sys.argv[2] == "shards":
    idx = scale_index.build_index(sys.argv[1], backend="ivfsq", progress=False)
else:
    paths, x, _ = scale_io.load_embeddings(sys.argv[1])
    idx = SimilarityIndex.build(x, paths, backend="ivfsq")
print(json.dumps({"seconds": time.perf_counter() - t, "n": len(idx), "params": idx.params,
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def index_memory(n: int, d: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_index_"))
    try:
        t = time.perf_counter()
        write_shards(tmp, n, d)
        print(f"{n:,} x {d} clustered vectors in {len(list(tmp.glob('*.parquet')))} parquet shards of 50,000 "
              f"(written in {time.perf_counter() - t:.0f} s)\n")
        print("| build | nlist | build (s) | peak memory (GB) |\n|---|---:|---:|---:|")
        for mode, label in (("memory", "all vectors loaded, SimilarityIndex.build"),
                            ("shards", "scale_index.build_index, shard by shard")):
            out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp), mode], capture_output=True, text=True,
                                 check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {label} | {r['params']['nlist']} | {r['seconds']:.1f} | {r['peak_gb']:.2f} |")
        print(f"\nraw vectors: {n * d * 4 / 1e9:.2f} GB; IVF-SQ8 codes: {n * d / 1e9:.2f} GB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--skip-embed", action="store_true")
    parser.add_argument("--skip-index", action="store_true")
    args = parser.parse_args()
    if not args.skip_embed:
        embed_rates(args.images, args.repeats, args.batch_size)
    if not args.skip_index:
        index_memory(args.n, args.d)


if __name__ == "__main__":
    main()
