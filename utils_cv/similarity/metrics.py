"""Retrieval metrics, exactly as the deep-metric-learning literature and
pytorch-metric-learning's ``AccuracyCalculator`` define them (see METRICS.md of the project).

Everything is computed from one quantity: for each query, the 1-based rank of every
relevant reference item in the ranking by ascending distance (ties: lower reference index
first). Queries are processed class by class and in row blocks: a block's distances and the
positions of its non-relevant items are the only large temporaries, so memory stays bounded
(about ``_BLOCK_BYTES``) however many queries there are.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from utils_cv.similarity.index import _as_matrix, _check_distance, pairwise_distances

logger = logging.getLogger(__name__)

__all__ = ["evaluate_retrieval", "pairwise_distances", "positive_ranks", "recall_at_k", "relevant_ranks"]

_BLOCK_BYTES = 256 * 1024 * 1024


def _labels(labels, n: int, name: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"The {name!r} parameter must hold one label per row ({n}); got {arr.shape}.")
    return arr


def _distances_t(q: torch.Tensor, r: torch.Tensor, r_sq: torch.Tensor | None, distance: str) -> torch.Tensor:
    prod = q @ r.T
    if distance == "cosine":
        return 1.0 - prod
    d2 = (q * q).sum(1, keepdim=True) + r_sq[None, :] - 2.0 * prod
    return d2.clamp_min_(0.0).sqrt_()


@dataclass
class _Ranks:
    """Ranks of the relevant items of each evaluated query (padded with 0)."""

    ranks: list[np.ndarray]  # one int64 array per query, ascending, 1-based
    num_excluded: int


def relevant_ranks(query, query_labels, reference=None, reference_labels=None, distance: str = "l2") -> tuple[list[np.ndarray], np.ndarray]:
    """1-based ranks of each query's relevant items (same label) in its full ranking.

    ``reference=None`` is leave-one-out over the queries (a query is removed from its own
    ranking). Returns ``(ranks, kept)``: ``ranks[j]`` is an ascending int64 array for the
    query ``kept[j]``; queries with no relevant item are not in ``kept``.
    """
    _check_distance(distance)
    q = _as_matrix(query, "query")
    y_q = _labels(query_labels, len(q), "query_labels")
    loo = reference is None
    if loo:
        if reference_labels is not None:
            raise ValueError("'reference_labels' was given without 'reference'.")
        r, y_r = q, y_q
    else:
        r = _as_matrix(reference, "reference")
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
    r_sq = (rt * rt).sum(1) if distance == "l2" else None
    n = len(r)
    out: dict[int, np.ndarray] = {}
    classes, y_q_idx = np.unique(y_q, return_inverse=True)
    for ci, c in enumerate(classes):
        rows = np.nonzero(y_q_idx == ci)[0]
        rel_cols = np.nonzero(y_r == c)[0]
        R = len(rel_cols) - (1 if loo else 0)
        if R <= 0:
            continue
        non_cols = np.nonzero(y_r != c)[0]
        rel_t, non_t = torch.from_numpy(rel_cols), torch.from_numpy(non_cols)
        step = max(1, min(len(rows), _BLOCK_BYTES // (16 * max(n, 1))))
        for start in range(0, len(rows), step):
            block = rows[start : start + step]
            d = _distances_t(qt[block], rt, r_sq, distance)
            if loo:
                d[torch.arange(len(block)), torch.from_numpy(block)] = float("inf")
            d_rel = d[:, rel_t]
            # stable sort keeps the lower reference index first among equal distances
            rel_sorted, order = torch.sort(d_rel, dim=1, stable=True)
            if loo:
                rel_sorted, order = rel_sorted[:, :R], order[:, :R]  # self (inf) sorts last
            rel_sorted = rel_sorted.contiguous()
            d_non = d[:, non_t].contiguous()
            # p[x] = number of relevant items strictly closer than non-relevant item x
            pos = torch.searchsorted(rel_sorted, d_non, right=False)
            ties = torch.searchsorted(rel_sorted, d_non, right=True) != pos
            if bool(ties.any()):
                _fix_ties(pos, ties, d_non, rel_sorted, order, rel_cols, non_cols)
            counts = torch.zeros((len(block), R + 1), dtype=torch.int64)
            counts.scatter_add_(1, pos, torch.ones_like(pos))
            nonrel_before = counts.cumsum(1)[:, :R]
            ranks = torch.arange(1, R + 1)[None, :] + nonrel_before
            for row, rk in zip(block, ranks.numpy()):
                out[int(row)] = rk
    kept = np.array(sorted(out), dtype=np.int64)
    return [out[i] for i in kept], kept


def _fix_ties(pos, ties, d_non, rel_sorted, order, rel_cols, non_cols) -> None:
    """Exact position of non-relevant items tied with relevant ones: lower index first."""
    for b, x in torch.nonzero(ties).tolist():
        value = d_non[b, x].item()
        idx_x = non_cols[x]
        lo = int(torch.searchsorted(rel_sorted[b], torch.tensor(value), right=False))
        hi = int(torch.searchsorted(rel_sorted[b], torch.tensor(value), right=True))
        tied_idx = rel_cols[order[b, lo:hi].numpy()]
        pos[b, x] = lo + int((tied_idx < idx_x).sum())


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
    ks = list(ks)
    if not ks or any(not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"The 'ks' parameter must be positive integers. Got {ks!r} instead.")
    nq = len(np.asarray(query_labels))
    ranks, kept = relevant_ranks(query, query_labels, reference, reference_labels, distance)
    excluded = nq - len(kept)
    if excluded:
        logger.warning("%d of %d queries have no relevant item in the gallery and are left out", excluded, nq)
    if not ranks:
        raise ValueError("No query has a relevant item (same label) in the gallery: nothing to evaluate.")
    first = np.array([rk[0] for rk in ranks], dtype=np.float64)
    r_prec, map_r, ap = np.empty(len(ranks)), np.empty(len(ranks)), np.empty(len(ranks))
    for j, rk in enumerate(ranks):
        R = len(rk)
        hits = np.arange(1, R + 1) / rk  # precision at each relevant item's rank
        within = rk <= R
        r_prec[j] = within.sum() / R
        map_r[j] = hits[within].sum() / R
        ap[j] = hits.mean()
    result = {f"recall@{k}": float((first <= k).mean()) for k in ks}
    result.update({
        "precision@1": float((first == 1).mean()),
        "r_precision": float(r_prec.mean()),
        "map@r": float(map_r.mean()),
        "map": float(ap.mean()),
        "mrr": float((1.0 / first).mean()),
        "num_queries": len(ranks),
        "num_excluded": excluded,
    })
    return result


def positive_ranks(features, sets, distance: str = "l2") -> np.ndarray:
    """Rank of the positive in each comparative set: 1 + number of negatives strictly closer
    to the query than the positive (1 is best). ``sets`` come from ``data.comparative_sets``."""
    f = _as_matrix(features, "features")
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
    if k < 1:
        raise ValueError(f"The 'k' parameter must be >= 1. Got {k!r} instead.")
    return float((ranks <= k).mean())
