"""Nearest-neighbour search. Smaller distance means closer; ties break by the lower index."""
from __future__ import annotations

import numpy as np

__all__ = ["DISTANCES", "knn", "pairwise_distances"]

DISTANCES = ("l2", "cosine")
_BLOCK_BYTES = 256 * 1024 * 1024  # the (rows x nr) float32 block of distances


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
    d2 = _sq_norms(qb)[:, None] + r_sq[None, :] - 2.0 * prod
    np.maximum(d2, 0.0, out=d2)
    return np.sqrt(d2, out=d2)


def pairwise_distances(query, reference, distance: str = "l2") -> np.ndarray:
    """Full (nq, nr) float32 distance matrix (for small sets; use :func:`knn` for large ones)."""
    q, r = _prepare(query, reference, distance)
    return _block_distances(q, r, _sq_norms(r) if distance == "l2" else None, distance)


def _row_block(nq: int, nr: int) -> int:
    return int(max(1, min(nq, _BLOCK_BYTES // (4 * max(nr, 1)))))


def _faiss():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return None
    return faiss


def _sq_norms(r: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", r, r)


def _exact_row(q_row: np.ndarray, r: np.ndarray, r_sq, distance: str, k: int, self_index: int | None):
    if distance == "l2" and r_sq is None:
        r_sq = _sq_norms(r)
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
    if exclude_self and nq != nr:
        raise ValueError(f"exclude_self=True needs query and reference to be the same rows; got {nq} and {nr} rows.")
    available = nr - 1 if exclude_self else nr
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"The 'k' parameter must be a positive integer. Got {k!r} instead.")
    if k > available:
        raise ValueError(f"The 'k' parameter ({k}) is larger than the {available} reference items available.")
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"The 'backend' parameter must be one of {{'auto', 'faiss', 'torch'}}. Got {backend!r} instead.")
    faiss = _faiss() if backend in ("auto", "faiss") else None
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

    r_sq = _sq_norms(r) if distance == "l2" else None
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
                d = prod.mul_(-2.0).add_((qb * qb).sum(1, keepdim=True)).add_(rt_sq[None, :]).clamp_min_(0.0)
            vals, inds = torch.topk(d, window, dim=1, largest=False, sorted=False)
            vals = vals.numpy() if distance == "cosine" else np.sqrt(vals.numpy())
            D[start:stop], I[start:stop] = _finish(vals, inds.numpy(), k, q[start:stop], r, r_sq, distance, start, exclude_self)
    return D, I
