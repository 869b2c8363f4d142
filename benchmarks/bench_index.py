"""SimilarityIndex backends at scale: build time, memory, queries/s and recall@10 vs exact.

    .venv/bin/python benchmarks/bench_index.py [--n 1000000] [--d 512] [--queries 10000]

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
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(1000, d)).astype(np.float32)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x[s:s + m] = centers[rng.integers(0, 1000, m)] + 0.5 * rng.normal(size=(m, d)).astype(np.float32)
    q = (centers[rng.integers(0, 1000, nq)] + 0.5 * rng.normal(size=(nq, d))).astype(np.float32)
    t = time.perf_counter()
    index = SimilarityIndex.build(x, range(n), backend=backend)
    build = time.perf_counter() - t
    t = time.perf_counter()
    _, ids = index.search(q, 10)
    search = time.perf_counter() - t
    np.save(out, ids.astype(np.int64))
    print(json.dumps({"build_s": build, "qps": nq / search,
                      "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
                      "params": index.params}))
""")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--backends", nargs="+", default=["exact", "ivfpq", "hnsw"])
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            out = Path(tmp) / f"{backend}.npy"
            proc = subprocess.run([sys.executable, "-c", CHILD, str(args.n), str(args.d), str(args.queries), backend,
                                   str(out)], capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{backend} failed:\n{proc.stderr[-2000:]}")
                continue
            rows[backend] = json.loads(proc.stdout.strip().splitlines()[-1])
            rows[backend]["ids"] = __import__("numpy").load(out)
    import numpy as np

    truth = rows["exact"]["ids"]
    print(f"{args.n:,} x {args.d} clustered vectors, {args.queries:,} queries, k = 10\n")
    print("| backend | parameters | build (s) | peak memory (GB) | queries/s | vs exact | recall@10 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(r["ids"], truth)])
        print(f"| {name} | {r['params']} | {r['build_s']:.1f} | {r['peak_gb']:.2f} | {r['qps']:.0f} | "
              f"{r['qps'] / rows['exact']['qps']:.1f}x | {recall:.3f} |")


if __name__ == "__main__":
    main()
