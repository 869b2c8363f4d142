"""Choosing a backend and its search parameters for a :class:`~utils_cv.similarity.index.SimilarityIndex`.

Measurement helpers, kept out of ``index.py`` because they are about benchmarking the index,
not about the index: :func:`recommend` builds each candidate backend on the user's own
features and picks the fastest that reaches a target recall, :func:`sweep_search_params`
measures query-time settings, and :func:`clustered_vectors` draws a seeded stand-in for a
large image collection. This module builds on ``index``; ``index`` never imports it.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from utils_cv.similarity._checks import as_matrix, positive_int
from utils_cv.similarity.distances import faiss_module
from utils_cv.similarity.index import SimilarityIndex

__all__ = ["clustered_vectors", "recommend", "sweep_search_params"]

log = logging.getLogger(__name__)


def recommend(features, target_recall: float = 0.95, k: int = 10, num_queries: int = 500,
              distance: str = "l2", candidates: list[tuple[str, dict]] | None = None, seed: int = 0) -> dict:
    """Measure recall@k against exact search and queries per second of each candidate on
    the user's own features; recommend the fastest that reaches ``target_recall``.

    Queries are ``num_queries`` rows of ``features`` (their own entry left out of the
    answers). Returns ``{"backend", "params", "table"}``; ``table`` has one dict per
    candidate (backend, params, build_s, qps, recall@k) and is also logged.
    """
    x = as_matrix(features, "features")
    if not 0 < target_recall <= 1:
        raise ValueError(f"The 'target_recall' parameter must be in (0, 1]. Got {target_recall!r} instead.")
    if len(x) <= k + 1:
        raise ValueError(f"recommend needs more than k + 1 = {k + 1} features; got {len(x)}.")
    rng = np.random.default_rng(seed)
    qi = rng.choice(len(x), size=min(num_queries, len(x)), replace=False)
    ids = list(range(len(x)))
    if candidates is None:
        candidates = [("exact", {}), ("hnsw", {}), ("hnsw", {"efSearch": 256})]
        if len(x) >= 256 * 4:
            candidates += [("ivfsq", {}), ("ivfsq", {"nprobe": 4}), ("ivfpq", {}), ("ivfpq", {"refine": False})]
        if faiss_module() is None:
            candidates = [("exact", {})]

    def answers(index):
        t = time.perf_counter()
        _, got = index.search(x[qi], k + 1)
        seconds = time.perf_counter() - t
        return [[i for i in row if i != q][:k] for row, q in zip(got.tolist(), qi)], seconds

    table, truth = [], None
    for backend, params in [("exact", {})] + [c for c in candidates if c != ("exact", {})]:
        t = time.perf_counter()
        index = SimilarityIndex.build(x, ids, backend=backend, distance=distance, **params)
        build_s = time.perf_counter() - t
        got, seconds = answers(index)
        if truth is None:
            truth = got
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth)]))
        row = {"backend": backend, "params": params, "build_s": build_s, "qps": len(qi) / seconds,
               f"recall@{k}": recall}
        if (backend, params) in candidates or backend == "exact":
            table.append(row)
        log.info("%-6s %-28s build %7.2f s  %9.0f queries/s  recall@%d %.3f", backend, params, build_s,
                 row["qps"], k, recall)
    good = [r for r in table if r[f"recall@{k}"] >= target_recall]
    best = max(good, key=lambda r: r["qps"]) if good else max(table, key=lambda r: r[f"recall@{k}"])
    return {"backend": best["backend"], "params": best["params"], "table": table}


def clustered_vectors(n: int, d: int = 512, clusters: int = 1000, noise: float = 0.5, seed: int = 0,
                      draw: int = 0) -> np.ndarray:
    """Synthetic (n, d) float32 features: Gaussian blobs of std ``noise`` around ``clusters``
    random centres (standard normal).

    A stand-in for a large image collection when measuring index speed and recall (real
    embeddings form clusters too). The centres depend on ``seed`` alone; ``draw`` picks an
    independent sample around the same centres, e.g. ``draw=1`` for queries of a
    ``draw=0`` collection. Generated in blocks of 100k rows: memory is the output alone.
    """
    for name, value in (("n", n), ("d", d), ("clusters", clusters)):
        positive_int(value, name)
    c = np.random.default_rng(seed).normal(size=(clusters, d)).astype(np.float32)
    rng = np.random.default_rng([seed, draw])
    x = np.empty((n, d), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x[start:start + m] = c[rng.integers(0, clusters, m)] + noise * rng.normal(size=(m, d)).astype(np.float32)
    return x


def sweep_search_params(index: "SimilarityIndex", query, settings: list[dict], k: int = 10,
                        truth: np.ndarray | None = None, exact: "SimilarityIndex | None" = None) -> list[dict]:
    """Queries per second and recall@k of ``index`` for each query-time setting.

    Args:
        settings: e.g. ``[{"efSearch": 16}, {"efSearch": 64}]`` for hnsw or
            ``[{"nprobe": 4}, {"nprobe": 16}]`` for ivfpq (see
            :meth:`SimilarityIndex.set_search_params`); ``{}`` keeps the current one.
        truth: the exact answers (nq, k) as ids; computed with ``exact`` when not given.

    Returns:
        One dict per setting: ``backend``, ``params`` (all of them), ``qps``, ``recall@k``.
        The index keeps the last setting.
    """
    q = as_matrix(query, "query")
    if truth is None:
        if exact is None:
            raise ValueError("Give either 'truth' (exact answers) or 'exact' (an exact index over the same items).")
        truth = exact.search(q, k)[1]
    rows = []
    for setting in settings:
        index.set_search_params(**setting)
        start = time.perf_counter()
        _, got = index.search(q, k)
        seconds = max(time.perf_counter() - start, 1e-9)
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got.tolist(), np.asarray(truth).tolist())]))
        rows.append({"backend": index.backend, "params": dict(index.params), "qps": len(q) / seconds,
                     f"recall@{k}": recall})
    return rows
