"""Distances between feature rows and exact k nearest neighbours: one formula for all.

Smaller means closer everywhere. ``"l2"`` is the Euclidean distance on the vectors given,
``"cosine"`` is 1 - cosine similarity. Squared L2 distances come from inner products as
``|q|^2 + |r|^2 - 2 q.r`` through :func:`squared_l2_`, which every caller (exact search,
metrics, re-ranking) uses on numpy arrays and torch tensors alike; ties break by the lower
reference index.
"""
from __future__ import annotations

import numpy as np

from utils_cv.similarity._checks import as_matrix, check_distance, positive_int

__all__ = ["faiss_module", "knn", "l2_normalize", "pairs_within", "pairwise_distances", "sq_norms", "squared_l2_"]

_BLOCK_BYTES = 256 * 1024 * 1024  # the (rows x nr) float32 block of distances


def l2_normalize(x, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm (zero rows stay zero). Returns float32, C-contiguous."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, eps), dtype=np.float32)


def sq_norms(r):
    """Squared L2 norm of each row (numpy array or torch tensor)."""
    if isinstance(r, np.ndarray):
        return np.einsum("ij,ij->i", r, r)
    return (r * r).sum(1)


def squared_l2_(prod, q_sq, r_sq):
    """Turn a block of inner products ``prod = q @ r.T`` into squared L2 distances, in place:
    ``-2 prod + |q|^2 + |r|^2``, clamped at 0. Works on numpy arrays and torch tensors."""
    prod *= -2.0
    prod += q_sq[:, None]
    prod += r_sq[None, :]
    if isinstance(prod, np.ndarray):
        np.maximum(prod, 0.0, out=prod)
    else:
        prod.clamp_min_(0.0)
    return prod


def faiss_module():
    """The faiss module, or None when it is not installed (``pip install faiss-cpu``)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _prepare(query, reference, distance):
    check_distance(distance)
    q = as_matrix(query, "query")
    r = as_matrix(reference, "reference")
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
    return np.sqrt(squared_l2_(prod, sq_norms(qb), r_sq), out=prod)


def pairwise_distances(query, reference, distance: str = "l2") -> np.ndarray:
    """Full (nq, nr) float32 distance matrix (for small sets; use :func:`knn` for large ones)."""
    q, r = _prepare(query, reference, distance)
    if len(q) == 0:
        raise ValueError("The 'query' parameter is empty: give at least one row.")
    return _block_distances(q, r, sq_norms(r) if distance == "l2" else None, distance)


def _row_block(nq: int, nr: int) -> int:
    return int(max(1, min(nq, _BLOCK_BYTES // (4 * max(nr, 1)))))


def _exact_row(q_row: np.ndarray, r: np.ndarray, r_sq, distance: str, k: int, self_index: int | None):
    if distance == "l2" and r_sq is None:
        r_sq = sq_norms(r)
    d = _block_distances(q_row[None, :], r, r_sq, distance)[0]
    if self_index is not None:
        d[self_index] = np.inf
    order = np.lexsort((np.arange(len(d)), d))[:k]
    return d[order], order


def _finish(Dc, Ic, k, q, r, r_sq, distance, row0, exclude_self):
    """Sort candidate rows by (distance, index), drop self-matches, keep k; rows whose k-th
    distance ties with the last candidate (so a lower index may lie outside the window) are
    recomputed exactly."""
    nr = len(r)
    if exclude_self:
        rows = np.arange(len(Dc))[:, None] + row0
        Dc = np.where(Ic == rows, np.inf, Dc)
    Ic = np.where(Ic < 0, nr, Ic)  # faiss pads with -1 when it finds fewer than asked
    order = np.lexsort((Ic, Dc), axis=1)
    Dc, Ic = np.take_along_axis(Dc, order, 1), np.take_along_axis(Ic, order, 1)
    D, I = Dc[:, :k].astype(np.float32), Ic[:, :k].astype(np.int64)
    window = Dc.shape[1]
    if window < nr:
        last = np.where(np.isfinite(Dc), Dc, -np.inf).max(axis=1)
        suspect = np.nonzero(Dc[:, k - 1] >= last)[0]
        for i in suspect:
            D[i], I[i] = _exact_row(q[i], r, r_sq, distance, k, row0 + i if exclude_self else None)
    return D, I


def knn(
    query,
    reference,
    k: int,
    distance: str = "l2",
    exclude_self: bool = False,
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of each query row among the reference rows.

    Args:
        query: (nq, d) float array.
        reference: (nr, d) float array.
        k: neighbours per query, 1 <= k <= nr (nr - 1 with ``exclude_self``).
        distance: ``"l2"`` (Euclidean) or ``"cosine"`` (1 - cosine similarity).
        exclude_self: query row i is reference row i (leave-one-out); never return it.
        backend: ``"faiss"`` (flat index), ``"torch"`` (blocked matrix product + top-k), or
            ``"auto"``: faiss when installed, torch otherwise.

    Returns:
        ``(D, I)``: (nq, k) float32 distances ascending and (nq, k) int64 reference indices;
        equal distances are ordered by the lower index. The torch path works in row blocks
        so its one large temporary, a block of distances, stays under about 256 MB
        whatever nq and nr (1,000 x 100,000 fits in one block).
    """
    q, r = _prepare(query, reference, distance)
    nq, nr = len(q), len(r)
    if nq == 0:
        raise ValueError("The 'query' parameter is empty: give at least one row.")
    if exclude_self and nq != nr:
        raise ValueError(f"exclude_self=True needs query and reference to be the same rows; got {nq} and {nr} rows.")
    available = nr - 1 if exclude_self else nr
    positive_int(k, "k")
    if k > available:
        raise ValueError(f"The 'k' parameter ({k}) is larger than the {available} reference items available.")
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"The 'backend' parameter must be one of {{'auto', 'faiss', 'torch'}}. Got {backend!r} instead.")
    faiss = faiss_module() if backend in ("auto", "faiss") else None
    if backend == "faiss" and faiss is None:
        raise ImportError("backend='faiss' needs faiss: pip install faiss-cpu (or utils_cv[faiss]).")
    window = min(nr, k + (1 if exclude_self else 0) + 8)
    if faiss is not None:
        idx = faiss.IndexFlatL2(r.shape[1]) if distance == "l2" else faiss.IndexFlatIP(r.shape[1])
        idx.add(r)
        Dc, Ic = idx.search(q, window)
        Dc = np.sqrt(np.maximum(Dc, 0.0)) if distance == "l2" else 1.0 - Dc
        return _finish(Dc, Ic, k, q, r, None, distance, 0, exclude_self)
    import torch

    r_sq = sq_norms(r) if distance == "l2" else None
    rt = torch.from_numpy(r)
    rt_sq = torch.from_numpy(r_sq) if r_sq is not None else None
    D = np.empty((nq, k), dtype=np.float32)
    I = np.empty((nq, k), dtype=np.int64)
    step = _row_block(nq, nr)
    with torch.inference_mode():
        for start in range(0, nq, step):
            stop = min(start + step, nq)
            qb = torch.from_numpy(q[start:stop])
            prod = qb @ rt.T
            if distance == "cosine":
                d = prod.neg_().add_(1.0)
            else:
                d = squared_l2_(prod, sq_norms(qb), rt_sq)
            vals, inds = torch.topk(d, window, dim=1, largest=False, sorted=False)
            vals = vals.numpy() if distance == "cosine" else np.sqrt(vals.numpy())
            D[start:stop], I[start:stop] = _finish(vals, inds.numpy(), k, q[start:stop], r, r_sq, distance, start, exclude_self)
    return D, I


def pairs_within(features, radius: float, distance: str = "l2", block_rows: int | None = None):
    """Every pair of rows closer than or at ``radius`` (a range search, not only the k nearest).

    Returns ``(i, j, d)``: int64, int64 and float32 arrays with ``i < j``, sorted by (i, j).
    Works in row blocks of one matrix product (torch, all cores), so memory is one
    (block x n) block whatever n; 10,000 x 1,280 takes about a second on 2 cores.
    """
    import torch

    check_distance(distance)
    x = as_matrix(features, "features")
    if isinstance(radius, bool) or not isinstance(radius, (int, float, np.floating, np.integer)) or not radius >= 0:
        raise ValueError(f"The 'radius' parameter must be a number >= 0. Got {radius!r} instead.")
    if distance == "cosine":
        x = l2_normalize(x)
    n = len(x)
    xt = torch.from_numpy(x)
    x_sq = sq_norms(xt)
    step = block_rows or _row_block(n, n)
    # compare squared distances with a little slack, then keep the exact ones <= radius
    limit = float(radius) ** 2 if distance == "l2" else float(radius)
    out_i, out_j, out_d = [], [], []
    with torch.inference_mode():
        for start in range(0, n, step):
            stop = min(n, start + step)
            prod = xt[start:stop] @ xt[start:].T  # only columns >= start: each pair once
            if distance == "cosine":
                d = prod.neg_().add_(1.0)
            else:
                d = squared_l2_(prod, x_sq[start:stop], x_sq[start:])
            rows, cols = torch.nonzero(d <= limit + 1e-6, as_tuple=True)
            vals = d[rows, cols]
            cols = cols + start
            rows = rows + start
            keep = cols > rows
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
            if distance == "l2":
                vals = vals.sqrt()
            keep = vals <= radius
            out_i.append(rows[keep].numpy())
            out_j.append(cols[keep].numpy())
            out_d.append(vals[keep].numpy())
    i = np.concatenate(out_i).astype(np.int64) if out_i else np.empty(0, np.int64)
    j = np.concatenate(out_j).astype(np.int64) if out_j else np.empty(0, np.int64)
    d = np.concatenate(out_d).astype(np.float32) if out_d else np.empty(0, np.float32)
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]
