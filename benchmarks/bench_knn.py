"""Exact k-NN throughput: 100,000 x 512 reference, 1,000 queries, k = 10 (synthetic, seeded).

    .venv/bin/python benchmarks/bench_knn.py [--n 100000] [--d 512] [--queries 1000]

Rows: faiss IndexFlatL2 used directly (the baseline), ``index.knn(backend="faiss")``,
``index.knn(backend="torch")`` (the path without faiss) and scikit-learn's brute force, all
in this process on the same data, best of 3. Goals: knn with faiss >= 0.9x the baseline,
the torch path within 2x (>= 0.5x).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from utils_cv.similarity import index


def best(fn, repeats=3):
    t_best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        t_best = min(t_best, time.perf_counter() - t)
    return t_best, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(1000, args.d)).astype(np.float32)
    ref = (centers[rng.integers(0, 1000, args.n)] + rng.normal(scale=0.5, size=(args.n, args.d))).astype(np.float32)
    q = (centers[rng.integers(0, 1000, args.queries)] + rng.normal(scale=0.5, size=(args.queries, args.d))).astype(np.float32)

    import faiss
    from sklearn.neighbors import NearestNeighbors

    def faiss_raw():
        idx = faiss.IndexFlatL2(args.d)
        idx.add(ref)
        return idx.search(q, args.k)

    nn = NearestNeighbors(n_neighbors=args.k, algorithm="brute").fit(ref)
    rows = {}
    rows["faiss IndexFlatL2 (baseline)"] = best(faiss_raw)
    rows["index.knn backend='faiss'"] = best(lambda: index.knn(q, ref, args.k, backend="faiss"))
    rows["index.knn backend='torch'"] = best(lambda: index.knn(q, ref, args.k, backend="torch"))
    rows["scikit-learn brute force"] = best(lambda: nn.kneighbors(q), repeats=1)
    base_t, (_, base_i) = rows["faiss IndexFlatL2 (baseline)"]
    print(f"exact k-NN: {args.n:,} x {args.d} reference, {args.queries:,} queries, k={args.k}, "
          f"faiss {faiss.omp_get_max_threads()} threads\n")
    print(f"| {'method':32s} | queries/s | vs faiss | same neighbours |\n|{'-' * 34}|----------:|---------:|----------------:|")
    for name, (t, out) in rows.items():
        ids = out[1]
        agree = (np.sort(ids, 1) == np.sort(base_i, 1)).mean()
        print(f"| {name:32s} | {args.queries / t:9.0f} | {base_t / t:7.2f}x | {agree:15.4f} |")


if __name__ == "__main__":
    main()
