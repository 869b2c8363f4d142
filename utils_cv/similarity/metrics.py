"""Retrieval metrics, exactly as the deep-metric-learning literature and
pytorch-metric-learning's ``AccuracyCalculator`` define them (definitions below).

Everything is computed from one quantity: for each query, the 1-based rank of every
relevant reference item in the ranking by ascending distance (ties: lower reference index
first). Queries are processed class by class and in row blocks: a block's distances and the
positions of its non-relevant items are the only large temporaries, so memory stays bounded
(about ``_BLOCK_BYTES``) however many queries there are.

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
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from utils_cv.similarity._checks import as_matrix, check_distance, check_labels, positive_int
from utils_cv.similarity.distances import pairwise_distances, sq_norms, squared_l2_

logger = logging.getLogger(__name__)

__all__ = ["bootstrap_interval", "evaluate_distances", "evaluate_retrieval", "pairwise_distances", "per_query_metrics",
           "positive_ranks", "recall_at_k", "relevant_ranks"]

_BLOCK_BYTES = 128 * 1024 * 1024
_BYTES_PER_SCORE = 4 + 8 + 4 + 1  # per (query, reference) pair: score, slot, neighbour value, tie flag


def _labels(labels, n: int, name: str) -> np.ndarray:
    return check_labels(labels, name, n)


def relevant_ranks(query, query_labels, reference=None, reference_labels=None, distance: str = "l2") -> tuple[list[np.ndarray], np.ndarray]:
    """1-based ranks of each query's relevant items (same label) in its full ranking.

    ``reference=None`` is leave-one-out over the queries (a query is removed from its own
    ranking). Returns ``(ranks, kept)``: ``ranks[j]`` is an ascending int64 array for the
    query ``kept[j]``; queries with no relevant item are not in ``kept``.

    How: queries are sorted by class and processed in row blocks of one matrix product. For
    a class with relevant columns sorted by (score, index), ``searchsorted`` places every
    gallery item among them; counting items per slot and accumulating gives, for the i-th
    relevant item, how many non-relevant items precede it. Exact ties between a relevant
    and a non-relevant item are resolved by index.
    """
    check_distance(distance)
    q = as_matrix(query, "query")
    if len(q) == 0:
        raise ValueError("The 'query' parameter is empty.")
    y_q = _labels(query_labels, len(q), "query_labels")
    loo = reference is None
    if loo:
        if reference_labels is not None:
            raise ValueError("'reference_labels' was given without 'reference'.")
        r, y_r = q, y_q
    else:
        r = as_matrix(reference, "reference")
        if reference_labels is None:
            raise ValueError("'reference_labels' is needed with 'reference'.")
        y_r = _labels(reference_labels, len(r), "reference_labels")
        if r.shape[1] != q.shape[1]:
            raise ValueError(f"'query' has dimension {q.shape[1]} but 'reference' has {r.shape[1]}: they must match.")
    if len(q) == 0:
        raise ValueError("The 'query' parameter is empty.")
    qt, rt = torch.from_numpy(q), torch.from_numpy(r)
    if distance == "cosine":
        qt = torch.nn.functional.normalize(qt, dim=1)
        rt = torch.nn.functional.normalize(rt, dim=1)
    r_sq = sq_norms(rt) if distance == "l2" else None
    n = len(r)
    # class of every query and reference as integers over the union of labels
    classes, inverse = np.unique(np.concatenate([y_q, y_r]), return_inverse=True)
    cq, cr = inverse[: len(q)], inverse[len(q):]
    rel_cols = {c: np.nonzero(cr == c)[0] for c in np.unique(cq)}
    order = np.argsort(cq, kind="stable")
    order = np.array([i for i in order if len(rel_cols[cq[i]]) - (1 if loo else 0) > 0], dtype=np.int64)
    out: dict[int, np.ndarray] = {}
    step = max(1, min(len(order), _BLOCK_BYTES // (_BYTES_PER_SCORE * max(n, 1))))
    # buffers reused by every block: steady memory, no allocator churn (fragmentation made
    # the resident size grow by ~1 GB at 100k queries without them)
    scores_buf = torch.empty((step, n), dtype=torch.float32)
    pos_buf = torch.empty((step, n), dtype=torch.int64)
    near_buf = torch.empty((step, n), dtype=torch.float32)
    tied_buf = torch.empty((step, n), dtype=torch.bool)
    is_rel = torch.zeros(n, dtype=torch.bool)
    with torch.inference_mode():
        for start in range(0, len(order), step):
            block = order[start : start + step]
            scores = scores_buf[: len(block)]
            torch.mm(qt[torch.from_numpy(block)], rt.T, out=scores)
            if distance == "cosine":
                scores.neg_()
            else:  # squared L2 orders like L2
                squared_l2_(scores, sq_norms(qt[torch.from_numpy(block)]), r_sq)
            if loo:
                scores[torch.arange(len(block)), torch.from_numpy(block)] = float("inf")
            bc = cq[block]
            bounds = np.flatnonzero(np.diff(bc)) + 1
            for seg_start, seg_stop in zip(np.r_[0, bounds], np.r_[bounds, len(block)]):
                c = bc[seg_start]
                cols = rel_cols[c]
                cols_t = torch.from_numpy(cols)
                R = len(cols) - (1 if loo else 0)
                rows = seg_stop - seg_start
                d = scores[seg_start:seg_stop]
                rel_sorted, rel_order = torch.sort(d[:, cols_t], dim=1, stable=True)
                rel_sorted = rel_sorted[:, :R].contiguous()  # in leave-one-out, self (inf) sorts last
                rel_order = rel_order[:, :R]
                pos = pos_buf[:rows]
                torch.searchsorted(rel_sorted, d, right=False, out=pos)  # relevant items strictly closer
                counts = torch.zeros((rows, R + 1), dtype=torch.int64)
                counts.scatter_add_(1, pos, torch.ones((1, 1), dtype=torch.int64).expand_as(pos))
                # remove the relevant items' own contributions (each sits at its value's first slot)
                own = torch.searchsorted(rel_sorted, rel_sorted, right=False)
                counts.scatter_add_(1, own, torch.full_like(own, -1))
                nonrel_before = counts.cumsum(1)[:, :R]
                # exact ties between a non-relevant item and a relevant value: order by index
                is_rel[cols_t] = True
                near = near_buf[:rows]
                torch.gather(rel_sorted, 1, pos.clamp_(max=R - 1), out=near)
                tied = tied_buf[:rows]
                torch.eq(near, d, out=tied)
                tied.logical_and_(~is_rel[None, :])
                is_rel[cols_t] = False
                if bool(tied.any()):
                    nonrel_before = _fix_ties(nonrel_before, tied, d, rel_sorted, rel_order, cols)
                ranks = torch.arange(1, R + 1)[None, :] + nonrel_before
                for row, rk in zip(block[seg_start:seg_stop], ranks.numpy()):
                    out[int(row)] = rk
    kept = np.array(sorted(out), dtype=np.int64)
    return [out[i] for i in kept], kept


def _fix_ties(nonrel_before, tied, d, rel_sorted, rel_order, cols):
    """A non-relevant item x tied with relevant values was counted as preceding all of them;
    it precedes only those of higher index: move it after the lower-index ones."""
    nonrel_before = nonrel_before.clone()
    for b, x in torch.nonzero(tied).tolist():
        value = d[b, x]
        lo = int(torch.searchsorted(rel_sorted[b], value.reshape(1), right=False))
        hi = int(torch.searchsorted(rel_sorted[b], value.reshape(1), right=True))
        tied_idx = cols[rel_order[b, lo:hi].numpy()]
        # relevant items lo..hi-1 (sorted by index) with index < x are not preceded by x
        n_before_x = int((tied_idx < x).sum())
        nonrel_before[b, lo : lo + n_before_x] -= 1
    return nonrel_before


def evaluate_retrieval(
    query,
    query_labels,
    reference=None,
    reference_labels=None,
    ks: Sequence[int] = (1, 2, 4, 8),
    distance: str = "l2",
) -> dict[str, float]:
    """Gallery-wide retrieval metrics.

    Args:
        query: (nq, d) features.
        query_labels: nq labels.
        reference, reference_labels: the gallery; None means leave-one-out over the queries.
        ks: the K of recall@K.
        distance: ``"l2"`` or ``"cosine"``.

    Returns:
        ``recall@K`` for each K, ``precision@1``, ``r_precision``, ``map@r``, ``map``
        (full ranking), ``mrr``; ``num_queries`` (evaluated) and ``num_excluded`` (queries
        with no relevant item in the gallery, left out of every metric).
    """
    ks = _check_ks(ks)
    nq = len(np.asarray(query_labels))
    ranks, kept = relevant_ranks(query, query_labels, reference, reference_labels, distance)
    return _summarise(ranks, nq - len(kept), nq, ks)


def _check_ks(ks) -> list[int]:
    ks = list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"The 'ks' parameter must be positive integers. Got {ks!r} instead.")
    return ks


def _per_query(ranks: list[np.ndarray], ks: list[int]) -> dict[str, np.ndarray]:
    first = np.array([rk[0] for rk in ranks], dtype=np.float64)
    r_prec, map_r, ap = np.empty(len(ranks)), np.empty(len(ranks)), np.empty(len(ranks))
    for j, rk in enumerate(ranks):
        R = len(rk)
        hits = np.arange(1, R + 1) / rk  # precision at each relevant item's rank
        within = rk <= R
        r_prec[j] = within.sum() / R
        map_r[j] = hits[within].sum() / R
        ap[j] = hits.mean()
    out = {f"recall@{k}": (first <= k).astype(np.float64) for k in ks}
    out.update({"precision@1": (first == 1).astype(np.float64), "r_precision": r_prec, "map@r": map_r, "map": ap,
                "mrr": 1.0 / first})
    return out


def _summarise(ranks: list[np.ndarray], excluded: int, nq: int, ks: list[int]) -> dict[str, float]:
    if excluded:
        logger.warning("%d of %d queries have no relevant item in the gallery and are left out", excluded, nq)
    if not ranks:
        raise ValueError("No query has a relevant item (same label) in the gallery: nothing to evaluate.")
    result = {name: float(values.mean()) for name, values in _per_query(ranks, ks).items()}
    result.update({"num_queries": len(ranks), "num_excluded": excluded})
    return result


def per_query_metrics(query, query_labels, reference=None, reference_labels=None, ks: Sequence[int] = (1, 2, 4, 8),
                      distance: str = "l2") -> dict[str, np.ndarray]:
    """The metrics of :func:`evaluate_retrieval` for each evaluated query (arrays aligned with
    ``kept``, the query rows that have a relevant item, under the key ``"query"``); their means
    are :func:`evaluate_retrieval`'s values. For intervals: :func:`bootstrap_interval`."""
    ks = _check_ks(ks)
    ranks, kept = relevant_ranks(query, query_labels, reference, reference_labels, distance)
    if not ranks:
        raise ValueError("No query has a relevant item (same label) in the gallery: nothing to evaluate.")
    return {"query": kept, **_per_query(ranks, ks)}


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
    y_q = _labels(query_labels, d.shape[0], "query_labels")
    loo = reference_labels is None
    if loo and d.shape[0] != d.shape[1]:
        raise ValueError(f"Without 'reference_labels' the distances must be square (leave-one-out); got {d.shape}.")
    y_r = y_q if loo else _labels(reference_labels, d.shape[1], "reference_labels")
    ranks = []
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
    return _summarise(ranks, len(d) - len(ranks), len(d), ks)


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
