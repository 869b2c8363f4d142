"""Retrieval metrics, exactly as the deep-metric-learning literature and
pytorch-metric-learning's ``AccuracyCalculator`` define them (definitions below).

Everything is computed from one quantity: for each query, the 1-based rank of every
relevant reference item in the ranking by ascending distance (ties: lower reference index
first), found without sorting whole rows by :mod:`utils_cv.similarity.ranking` (tiles of one
matrix product; memory bounded however many queries there are). ``metrics=`` computes only
what is asked: recall@K, precision@1 and MRR need only the first relevant item's rank.

Definitions (queries q, gallery G, relevant = same label; in leave-one-out q is removed from
its own ranking; R_q = relevant items in G; queries with R_q = 0 are left out of every
metric and counted in ``num_excluded``; rel_q(i) = 1 when the i-th ranked item is relevant):

* ``recall@K``: mean over q of 1[some i <= K has rel_q(i) = 1] (a hit rate; recall@1 =
  precision@1).
* ``precision@1``: mean of rel_q(1).
* ``r_precision``: mean of (1/R_q) sum_{i<=R_q} rel_q(i).
* ``map@r`` (MAP@R, "A Metric Learning Reality Check"): mean of
  (1/R_q) sum_{i<=R_q} P_q(i) rel_q(i), with P_q(i) = (1/i) sum_{j<=i} rel_q(j).
* ``map``: as ``map@r`` over the whole ranking (average precision).
* ``mrr``: mean of 1 / (rank of the first relevant item).
* Comparative sets (:func:`positive_ranks`): 1 query, 1 positive, N negatives;
  rank = 1 + negatives strictly closer than the positive. Not comparable to gallery-wide
  recall@K.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from utils_cv.similarity import ranking
from utils_cv.similarity._checks import as_matrix, check_distance, check_labels, positive_int
from utils_cv.similarity.distances import pairwise_distances

logger = logging.getLogger(__name__)

__all__ = ["METRICS", "bootstrap_interval", "evaluate_distances", "evaluate_retrieval", "pairwise_distances",
           "per_query_metrics", "positive_ranks", "recall_at_k", "relevant_ranks"]

METRICS = ("recall", "precision@1", "r_precision", "map@r", "map", "mrr")  # "recall": recall@K for K in ks
_FIRST_RANK_ONLY = {"recall", "precision@1", "mrr"}  # these need only the first relevant item's rank


def _prepare(query, query_labels, reference, reference_labels, distance):
    check_distance(distance)
    q = as_matrix(query, "query")
    if len(q) == 0:
        raise ValueError("The 'query' parameter is empty.")
    y_q = check_labels(query_labels, "query_labels", len(q))
    if reference is None:
        if reference_labels is not None:
            raise ValueError("'reference_labels' was given without 'reference'.")
        return q, y_q, None, None
    r = as_matrix(reference, "reference")
    if reference_labels is None:
        raise ValueError("'reference_labels' is needed with 'reference'.")
    y_r = check_labels(reference_labels, "reference_labels", len(r))
    if r.shape[1] != q.shape[1]:
        raise ValueError(f"'query' has dimension {q.shape[1]} but 'reference' has {r.shape[1]}: they must match.")
    return q, y_q, r, y_r


def _check_metrics(metrics) -> tuple[str, ...]:
    if metrics is None:
        return METRICS
    names = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ValueError(f"The 'metrics' parameter must name some of {list(METRICS)}. Got {metrics!r} instead.")
    return tuple(m for m in METRICS if m in names)


def _ranked(query, query_labels, reference, reference_labels, distance, names) -> ranking.RankedRelevant:
    q, y_q, r, y_r = _prepare(query, query_labels, reference, reference_labels, distance)
    depth = "first" if set(names) <= _FIRST_RANK_ONLY else "all" if "map" in names else "within"
    return ranking.rank_relevant(q, y_q, r, y_r, distance, depth)


def relevant_ranks(query, query_labels, reference=None, reference_labels=None, distance: str = "l2") -> tuple[list[np.ndarray], np.ndarray]:
    """1-based ranks of each query's relevant items (same label) in its full ranking.

    ``reference=None`` is leave-one-out over the queries (a query is removed from its own
    ranking). Returns ``(ranks, kept)``: ``ranks[j]`` is an ascending int64 array for the
    query ``kept[j]``; queries with no relevant item are not in ``kept``. How the ranks are
    found without sorting whole rows: :mod:`utils_cv.similarity.ranking`.
    """
    res = _ranked(query, query_labels, reference, reference_labels, distance, METRICS)
    order = np.argsort(res.query, kind="stable")
    return [res.ranks[res.offsets[j] : res.offsets[j + 1]] for j in order], res.query[order]


def evaluate_retrieval(
    query,
    query_labels,
    reference=None,
    reference_labels=None,
    ks: Sequence[int] = (1, 2, 4, 8),
    distance: str = "l2",
    metrics: Sequence[str] | None = None,
) -> dict[str, float]:
    """Gallery-wide retrieval metrics.

    Args:
        query: (nq, d) features.
        query_labels: nq labels.
        reference, reference_labels: the gallery; None means leave-one-out over the queries.
        ks: the K of recall@K.
        distance: ``"l2"`` or ``"cosine"``.
        metrics: which of :data:`METRICS` to compute (None: all; ``"recall"`` is recall@K
            for every K in ``ks``). Asking only for ``recall``, ``precision@1`` and ``mrr``
            is much faster: they need only each query's first relevant item.

    Returns:
        ``recall@K`` for each K, ``precision@1``, ``r_precision``, ``map@r``, ``map``
        (full ranking), ``mrr`` (those asked for); ``num_queries`` (evaluated) and
        ``num_excluded`` (queries with no relevant item in the gallery, left out of every metric).
    """
    ks, names = _check_ks(ks), _check_metrics(metrics)
    res = _ranked(query, query_labels, reference, reference_labels, distance, names)
    return _summarise(res, len(np.asarray(query_labels)), ks, names)


def _check_ks(ks) -> list[int]:
    ks = list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"The 'ks' parameter must be positive integers. Got {ks!r} instead.")
    return ks


def _per_query(res: ranking.RankedRelevant, ks: list[int], names=METRICS) -> dict[str, np.ndarray]:
    """Per-query metrics from CSR ranks, in ascending query order (vectorised over all ranks)."""
    order = np.argsort(res.query, kind="stable")
    first = res.ranks[res.offsets[:-1]].astype(np.float64)
    out = {}
    if "recall" in names:
        out.update({f"recall@{k}": (first <= k).astype(np.float64) for k in ks})
    if "precision@1" in names:
        out["precision@1"] = (first == 1).astype(np.float64)
    if {"r_precision", "map@r", "map"} & set(names):
        sums = {name: np.zeros(len(first)) for name in ("r_precision", "map@r", "map")}
        # rows in blocks of about a million ranks: the float64 temporaries stay small
        cuts = np.unique(np.r_[np.searchsorted(res.offsets, np.arange(0, res.offsets[-1], 1 << 20), "right") - 1,
                               len(first)])
        for a, b in zip(cuts[:-1], cuts[1:]):
            lo, hi = res.offsets[a], res.offsets[b]
            rk, lengths = res.ranks[lo:hi], np.diff(res.offsets[a : b + 1])
            block_starts = res.offsets[a:b] - lo
            hits = (np.arange(hi - lo) - np.repeat(block_starts - 1, lengths)) / rk  # precision at each
            within = rk <= np.repeat(res.num_relevant[a:b], lengths)
            sums["r_precision"][a:b] = np.add.reduceat(within, block_starts)
            sums["map@r"][a:b] = np.add.reduceat(np.where(within, hits, 0.0), block_starts)
            sums["map"][a:b] = np.add.reduceat(hits, block_starts)
        out.update({name: sums[name] / res.num_relevant for name in sums if name in names})
    if "mrr" in names:
        out["mrr"] = 1.0 / first
    return {key: values[order] for key, values in out.items()}


def _summarise(res: ranking.RankedRelevant, nq: int, ks: list[int], names=METRICS) -> dict[str, float]:
    excluded = nq - len(res.query)
    if excluded:
        logger.warning("%d of %d queries have no relevant item in the gallery and are left out", excluded, nq)
    if not len(res.query):
        raise ValueError("No query has a relevant item (same label) in the gallery: nothing to evaluate.")
    result = {name: float(values.mean()) for name, values in _per_query(res, ks, names).items()}
    result.update({"num_queries": len(res.query), "num_excluded": excluded})
    return result


def per_query_metrics(query, query_labels, reference=None, reference_labels=None, ks: Sequence[int] = (1, 2, 4, 8),
                      distance: str = "l2", metrics: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The metrics of :func:`evaluate_retrieval` for each evaluated query (arrays aligned with
    ``kept``, the query rows that have a relevant item, under the key ``"query"``); their means
    are :func:`evaluate_retrieval`'s values. For intervals: :func:`bootstrap_interval`."""
    ks, names = _check_ks(ks), _check_metrics(metrics)
    res = _ranked(query, query_labels, reference, reference_labels, distance, names)
    if not len(res.query):
        raise ValueError("No query has a relevant item (same label) in the gallery: nothing to evaluate.")
    return {"query": np.sort(res.query), **_per_query(res, ks, names)}


def bootstrap_interval(values, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per query): how much
    a metric could move with another draw of queries of the same kind. Small test sets give
    wide intervals; a difference inside them is not a difference."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError(f"The 'values' parameter must be a non-empty 1-D array. Got shape {v.shape}.")
    if not 0 < level < 1:
        raise ValueError(f"The 'level' parameter must be in (0, 1). Got {level!r} instead.")
    positive_int(n_boot, "n_boot")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 256):  # blocks keep the (draws x n) index matrix small
        stop = min(n_boot, start + 256)
        means[start:stop] = v[rng.integers(0, len(v), size=(stop - start, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def evaluate_distances(distances, query_labels, reference_labels=None,
                       ks: Sequence[int] = (1, 2, 4, 8)) -> dict[str, float]:
    """The metrics of :func:`evaluate_retrieval` from a precomputed (nq, nr) distance matrix
    (smaller is closer; ties by lower reference index), e.g. re-ranked distances.

    ``reference_labels=None``: the matrix is square over the queries themselves and the
    diagonal (each query against itself) is left out, as in leave-one-out.
    """
    ks = _check_ks(ks)
    d = np.asarray(distances)
    if d.ndim != 2 or not np.issubdtype(d.dtype, np.number):
        raise ValueError(f"The 'distances' parameter must be a 2-D numeric (nq, nr) array. Got shape {d.shape}.")
    if np.isnan(d).any():
        raise ValueError("The 'distances' parameter contains NaN values.")
    y_q = check_labels(query_labels, "query_labels", d.shape[0])
    loo = reference_labels is None
    if loo and d.shape[0] != d.shape[1]:
        raise ValueError(f"Without 'reference_labels' the distances must be square (leave-one-out); got {d.shape}.")
    y_r = y_q if loo else check_labels(reference_labels, "reference_labels", d.shape[1])
    ranks, kept = [], []
    for i in range(len(d)):
        row = d[i].astype(np.float64, copy=True)
        relevant = y_r == y_q[i]
        if loo:
            row[i] = np.inf
            relevant[i] = False
        if not relevant.any():
            continue
        order = np.argsort(row, kind="stable")
        if loo:  # itself, at +inf, goes to the very end (after any other +inf): drop it
            order = order[order != i]
        ranks.append(np.flatnonzero(relevant[order]).astype(np.int64) + 1)
        kept.append(i)
    lengths = np.array([len(rk) for rk in ranks], dtype=np.int64)
    res = ranking.RankedRelevant(query=np.array(kept, dtype=np.int64), offsets=np.r_[0, np.cumsum(lengths)],
                                 ranks=np.concatenate(ranks) if ranks else np.empty(0, np.int64), num_relevant=lengths)
    return _summarise(res, len(d), ks)


def positive_ranks(features, sets, distance: str = "l2") -> np.ndarray:
    """Rank of the positive in each comparative set: 1 + number of negatives strictly closer
    to the query than the positive (1 is best). ``sets`` come from ``data.comparative_sets``."""
    f = as_matrix(features, "features")
    out = np.empty(len(sets), dtype=np.int64)
    for i, s in enumerate(sets):
        cand = np.concatenate([[s.positive], np.asarray(s.negatives, dtype=np.int64)])
        d = pairwise_distances(f[[s.query]], f[cand], distance)[0]
        out[i] = 1 + int((d[1:] < d[0]).sum())
    return out


def recall_at_k(ranks, k: int) -> float:
    """Share of comparative sets whose positive has rank <= k."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("The 'ranks' parameter is empty.")
    positive_int(k, "k")
    return float((ranks <= k).mean())
