"""Nearest-neighbour search. Smaller distance means closer; ties break by the lower index."""
from __future__ import annotations

import numpy as np

__all__ = ["DISTANCES", "knn", "pairwise_distances"]

DISTANCES = ("l2", "cosine")
_BLOCK_BYTES = 128 * 1024 * 1024


def _as_matrix(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"The {name!r} parameter must be a 2-D (n, d) array. Got shape {x.shape} instead.")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"The {name!r} parameter must hold floats. Got dtype {x.dtype} instead.")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"The {name!r} parameter contains NaN or infinite values.")
    return x


def _check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"The 'distance' parameter must be one of {set(DISTANCES)}. Got {distance!r} instead.")


def _prepare(query, reference, distance):
    _check_distance(distance)
    q = _as_matrix(query, "query")
    r = _as_matrix(reference, "reference")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"'query' has dimension {q.shape[1]} but 'reference' has {r.shape[1]}: they must match.")
    if distance == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    return q, r


def _block_distances(qb: np.ndarray, r: np.ndarray, r_sq: np.ndarray | None, distance: str) -> np.ndarray:
    prod = qb @ r.T
    if distance == "cosine":
        return np.subtract(1.0, prod, out=prod)
    d2 = (qb * qb).sum(1, keepdims=True) + r_sq[None, :] - 2.0 * prod
    np.maximum(d2, 0.0, out=d2)
    return np.sqrt(d2, out=d2)


def pairwise_distances(query, reference, distance: str = "l2") -> np.ndarray:
    """Full (nq, nr) float32 distance matrix (for small sets; use :func:`knn` for large ones)."""
    q, r = _prepare(query, reference, distance)
    return _block_distances(q, r, (r * r).sum(1) if distance == "l2" else None, distance)


def _row_block(nq: int, nr: int) -> int:
    return int(max(1, min(nq, _BLOCK_BYTES // (4 * max(nr, 1) * 3))))


def _topk_rows(d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k smallest per row, sorted by (distance, index)."""
    n = d.shape[1]
    if k < n:
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), d.shape).copy()
    vals = np.take_along_axis(d, part, axis=1)
    kth = vals.max(axis=1)
    # rows with ties at the k-th distance may have picked a higher index: redo those exactly
    n_le = (d <= kth[:, None]).sum(axis=1)
    for row in np.nonzero(n_le > k)[0]:
        cand = np.nonzero(d[row] <= kth[row])[0]
        order = np.lexsort((cand, d[row, cand]))[:k]
        part[row] = cand[order]
        vals[row] = d[row, part[row]]
    order = np.lexsort((part, vals), axis=1)
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(part, order, axis=1)


def knn(query, reference, k: int, distance: str = "l2", exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of each query row among the reference rows.

    Args:
        query: (nq, d) float array.
        reference: (nr, d) float array.
        k: neighbours per query, 1 <= k <= nr (nr - 1 with ``exclude_self``).
        distance: ``"l2"`` (Euclidean) or ``"cosine"`` (1 - cosine similarity).
        exclude_self: query row i is reference row i (leave-one-out); never return it.

    Returns:
        ``(D, I)``: (nq, k) float32 distances ascending and (nq, k) int64 reference indices;
        equal distances are ordered by the lower index. Computed in row blocks so that the
        temporaries stay under about 128 MB whatever nq and nr.
    """
    q, r = _prepare(query, reference, distance)
    nq, nr = len(q), len(r)
    if exclude_self and nq != nr:
        raise ValueError(f"exclude_self=True needs query and reference to be the same rows; got {nq} and {nr} rows.")
    available = nr - 1 if exclude_self else nr
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"The 'k' parameter must be a positive integer. Got {k!r} instead.")
    if k > available:
        raise ValueError(f"The 'k' parameter ({k}) is larger than the {available} reference items available.")
    r_sq = (r * r).sum(1) if distance == "l2" else None
    D = np.empty((nq, k), dtype=np.float32)
    I = np.empty((nq, k), dtype=np.int64)
    step = _row_block(nq, nr)
    for start in range(0, nq, step):
        stop = min(start + step, nq)
        d = _block_distances(q[start:stop], r, r_sq, distance)
        if exclude_self:
            rows = np.arange(stop - start)
            d[rows, rows + start] = np.inf
        D[start:stop], I[start:stop] = _topk_rows(d, k)
    return D, I
