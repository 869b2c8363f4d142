"""SimilarityIndex backends at scale: build time, memory, queries/s and recall@10 vs exact.

    .venv/bin/python benchmarks/bench_index.py [--n 1000000] [--d 512] [--queries 10000] [--sweep]
    .venv/bin/python benchmarks/bench_index.py --features ~/.cache/utils_cv/datasets/openclipart --queries 400 --sweep

Synthetic clustered vectors (seeded). Each backend builds and searches in its own child
process, so the peak resident memory it reports is its own (the data set itself included:
n x d x 4 bytes). recall@10 is measured against the exact backend's answers; speed ratios
are against the exact backend in the same run. Goal: the best approximate backend at
recall@10 >= 0.95 and >= 100x the exact backend's queries/s.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np
    from utils_cv.similarity.index import SimilarityIndex
    n, d, nq, backend, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    if len(sys.argv) > 8:  # real features: a seeded random nq rows are the queries, the rest the index
        feats = np.load(sys.argv[8])
        pick = np.random.default_rng(0).permutation(len(feats))
        q, x = feats[pick[:nq]], feats[pick[nq:]]
        n = len(x)
    else:
        rng = np.random.default_rng(0)
        centers = rng.normal(size=(1000, d)).astype(np.float32)
        x = np.empty((n, d), np.float32)
        for s in range(0, n, 100_000):
            m = min(100_000, n - s)
            x[s:s + m] = centers[rng.integers(0, 1000, m)] + 0.5 * rng.normal(size=(m, d)).astype(np.float32)
        q = (centers[rng.integers(0, 1000, nq)] + 0.5 * rng.normal(size=(nq, d))).astype(np.float32)
    params = json.loads(sys.argv[6])
    t = time.perf_counter()
    index = SimilarityIndex.build(x, range(n), backend=backend, **params)
    build = time.perf_counter() - t
    del x
    rows = []
    for j, setting in enumerate(json.loads(sys.argv[7])):
        index.set_search_params(**setting)
        t = time.perf_counter()
        _, ids = index.search(q, 10)
        search = time.perf_counter() - t
        np.save(f"{out}.{j}.npy", ids.astype(np.int64))
        rows.append({"build_s": build, "qps": nq / search, "params": dict(index.params)})
    print(json.dumps({"peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, "rows": rows}))
""")


def _features_file(path: Path) -> Path:
    """An .npy of features: ``path`` itself, or the cached embedding of the image folder ``path``."""
    if path.suffix == ".npy":
        return path
    cached = path.with_name(path.name + "_efficientnet_lite0.npy")
    if not cached.exists():
        import numpy as np

        from utils_cv.common.paths import atomic_write
        from utils_cv.similarity import data, features, model

        paths, _ = data.list_images(path)
        net, transform = model.create_backbone()
        feats = features.extract_features(net, paths, transform, progress=False)
        with atomic_write(cached) as f:
            np.save(f, feats)
    return cached


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--backends", nargs="+", default=["exact", "ivfsq", "ivfpq", "hnsw"])
    parser.add_argument("--build-params", default="{}",
                        help='JSON per backend, e.g. \'{"hnsw": {"efConstruction": 100}}\'')
    parser.add_argument("--sweep", action="store_true",
                        help="also search with other query-time settings (efSearch, nprobe, k_factor)")
    parser.add_argument("--features", help="real features instead of synthetic ones: an .npy file, or an image "
                                           "folder embedded with the default backbone (cached beside it as .npy)")
    args = parser.parse_args()
    build_params = json.loads(args.build_params)
    extra = []
    if args.features:
        path = _features_file(Path(args.features).expanduser())
        import numpy as np

        shape = np.load(path, mmap_mode="r").shape
        args.n, args.d = shape[0] - args.queries, shape[1]
        extra = [str(path)]
    sweeps = {"exact": [{}], "hnsw": [{}], "ivfpq": [{}], "ivfsq": [{}]}
    if args.sweep:
        sweeps["hnsw"] = [{"efSearch": e} for e in (16, 32, 64, 128, 256)]
        sweeps["ivfsq"] = [{"nprobe": p} for p in (2, 4, 8, 16)]
        sweeps["ivfpq"] = [{"nprobe": p, "k_factor": f} for p, f in ((4, 16), (4, 32), (8, 32), (8, 64), (16, 64))]
    import numpy as np

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ["exact"] + [b for b in args.backends if b != "exact"]:
            out = Path(tmp) / backend
            proc = subprocess.run([sys.executable, "-c", CHILD, str(args.n), str(args.d), str(args.queries), backend,
                                   str(out), json.dumps(build_params.get(backend, {})), json.dumps(sweeps[backend]), *extra],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{backend} failed:\n{proc.stderr[-2000:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            for j, row in enumerate(r["rows"]):
                row.update(backend=backend, peak_gb=r["peak_gb"], ids=np.load(f"{out}.{j}.npy"))
                results.append(row)
            print(f"{backend} done", file=sys.stderr, flush=True)

    truth, exact_qps = results[0]["ids"], results[0]["qps"]
    what = f"features of {args.features}" if args.features else "clustered vectors"
    print(f"{args.n:,} x {args.d} {what}, {args.queries:,} queries, k = 10\n")
    print("| backend | parameters | build (s) | peak memory (GB) | queries/s | vs exact | recall@10 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(r["ids"], truth)])
        print(f"| {r['backend']} | {r['params']} | {r['build_s']:.1f} | {r['peak_gb']:.2f} | {r['qps']:.0f} | "
              f"{r['qps'] / exact_qps:.1f}x | {recall:.3f} |")


if __name__ == "__main__":
    main()
