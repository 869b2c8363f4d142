"""Diffusion on the nearest-neighbour graph of a collection, a training-free re-ranking (Iscen,
Tolias, Avrithis, Furon & Chum, "Efficient Diffusion on Region Manifolds", CVPR 2017; global
descriptors, one vector per image).

Idea: images of one class form a thin, curved manifold in feature space; a walk along the
graph of mutual nearest neighbours follows it further than a straight distance does. Over the
gallery (L2-normalised, ``n`` images):

1. ``W``: each image's ``k`` nearest others, weighted by ``max(cos, 0) ** gamma``, kept where
   the two are in each other's lists (mutual neighbours: ``W = min(W, W.T)``).
2. ``S = D^-1/2 W D^-1/2`` with ``D`` the degrees; a query's vector ``y`` holds the same
   weights for its ``kq`` nearest gallery images and 0 elsewhere.
3. ``f`` solves ``(I - alpha S) f = y`` (up to 4,096 images through the inverse, computed once
   per graph; above, by conjugate gradient on the sparse ``S``), and the ranking's scores are
   ``f / sqrt(D)``: as ``alpha`` nears 1, ``f`` tends to ``sqrt(D)`` whatever the query, so
   without the division images with many neighbours rank first for every query. Gallery
   images that the walk does not reach (score 0) follow, ordered by their cosine distance.

Memory: the graph holds at most ``n k`` weights, the inverse of a small gallery ``n^2`` floats
(128 MB at 4,096 images); the (nq, n) result and its float64 blocks come on top.
:func:`default_k` sizes the graph for the collection: the graph's edges must mostly stay inside
classes, and small collections have small classes (see BENCHMARKS.md, "Training-free
improvements").
"""
from __future__ import annotations

import logging
import math

import numpy as np
from scipy import sparse

from utils_cv.similarity._checks import as_matrix, positive_int
from utils_cv.similarity.distances import knn, l2_normalize, pairwise_distances

__all__ = ["ALPHA", "GAMMA", "K_MAX", "KQ", "DiffusionGraph", "default_k", "diffusion_distances"]

log = logging.getLogger(__name__)
ALPHA = 0.99  # the paper's values
GAMMA = 3.0
K_MAX = 50
KQ = 5
_TOL, _MAX_ITER = 1e-4, 500  # the conjugate gradient's stop
_BLOCK_BYTES = 64 * 1024 * 1024  # the (n, queries) float64 blocks of the solver
_DENSE_MAX = 4096  # up to this many images the inverse is computed once (n^3 flops, n^2 float64)


def default_k(n: int) -> int:
    """Neighbours per image in the graph of ``n`` images: ``round(sqrt(n))`` within [5, 50]
    (50, the paper's value, from 2,500 images on), never more than ``n - 1``."""
    positive_int(n, "n")
    return max(1, min(n - 1, K_MAX, max(5, round(math.sqrt(n)))))


def _number(value, name: str, low: float, high: float, open_low: bool, open_high: bool) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if ok:
        v = float(value)
        ok = (v > low if open_low else v >= low) and (v < high if open_high else v <= high)
    if not ok:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ValueError(f"The {name!r} parameter must be a number in {interval}. Got {value!r} instead.")
    return float(value)


def _weights(cos_distances: np.ndarray, gamma: float) -> np.ndarray:
    return np.clip(1.0 - cos_distances.astype(np.float64), 0.0, None) ** gamma


class DiffusionGraph:
    """The mutual-neighbour graph of a gallery, ready to diffuse queries over it.

    Args:
        gallery: (n, d) features (L2-normalised inside).
        k: neighbours per image; None: :func:`default_k` of ``n``.
        alpha: how far the walk goes, in (0, 1) (0.99 in the paper; near 0 keeps the
            ``kq`` direct neighbours only).
        gamma: power of the cosine similarities (3 in the paper), > 0.
    """

    def __init__(self, gallery, k: int | None = None, alpha: float = ALPHA, gamma: float = GAMMA):
        x = l2_normalize(as_matrix(gallery, "gallery"))
        n = len(x)
        if n < 2:
            raise ValueError(f"The 'gallery' parameter must hold at least 2 images for a graph; got {n}.")
        self.k = default_k(n) if k is None else k
        positive_int(self.k, "k")
        if self.k > n - 1:
            raise ValueError(f"The 'k' parameter ({self.k}) must be at most n - 1 = {n - 1} for a gallery of {n} "
                             "images. Lower k, or pass k=None for a size that suits the gallery.")
        self.alpha = _number(alpha, "alpha", 0.0, 1.0, True, True)
        self.gamma = _number(gamma, "gamma", 0.0, math.inf, True, True)
        self.gallery = x
        D, I = knn(x, x, self.k, distance="cosine", exclude_self=True)
        w = sparse.csr_matrix((_weights(D, self.gamma).ravel(), I.ravel(), np.arange(0, n * self.k + 1, self.k)),
                              shape=(n, n))
        w = w.minimum(w.T).tocsr()
        w.eliminate_zeros()
        degree = np.asarray(w.sum(axis=1)).ravel()
        self.isolated = int((degree == 0).sum())
        self.degree = np.where(degree > 0, degree, 1.0)
        inv_sqrt = sparse.diags(1.0 / np.sqrt(self.degree))
        self._s = (inv_sqrt @ w @ inv_sqrt).tocsr()
        self._inverse = None  # (I - alpha S)^-1 of a small gallery, made on first use
        log.info("Diffusion graph: %d images, k %d, %d mutual edges, %d without any", n, self.k, w.nnz // 2,
                 self.isolated)

    def __len__(self) -> int:
        return len(self.gallery)

    def _solve(self, y: np.ndarray, tol: float, max_iter: int) -> np.ndarray:
        """``(I - alpha S) f = y`` for every column of ``y`` at once, by conjugate gradient until each
        column's residual falls below ``tol`` times its start (a warning after ``max_iter`` steps)."""
        f = np.zeros_like(y)
        r = y.copy()
        p = r.copy()
        rs = (r * r).sum(0)
        stop = (tol * np.sqrt(rs)) ** 2
        for _ in range(max_iter):
            active = rs > stop
            if not active.any():
                break
            ap = p - self.alpha * (self._s @ p)
            step = np.where(active, rs / np.maximum((p * ap).sum(0), 1e-300), 0.0)
            f += step * p
            r -= step * ap
            new = (r * r).sum(0)
            p = r + np.where(active, new / np.maximum(rs, 1e-300), 0.0) * p
            rs = new
        else:
            if (rs > stop).any():
                log.warning("Diffusion: %d of %d queries had not converged after max_iter=%d steps of conjugate "
                            "gradient; raise max_iter or tol.", int((rs > stop).sum()), y.shape[1], max_iter)
        return f

    def _dense_inverse(self) -> np.ndarray:
        if self._inverse is None:
            self._inverse = np.linalg.inv(np.eye(len(self)) - self.alpha * self._s.toarray())
        return self._inverse

    def scores(self, queries=None, kq: int | None = None, tol: float = _TOL, max_iter: int = _MAX_ITER) -> np.ndarray:
        """(nq, n) diffusion scores of each query over the gallery, larger is closer.

        Args:
            queries: (nq, d) features; None: the gallery images themselves, each seeded by its
                ``kq`` nearest others (leave-one-out); its own score is left as the walk gives it.
            kq: gallery neighbours that seed each query; None: 5, or fewer when the gallery is smaller.
            tol, max_iter: the conjugate gradient's stop (galleries above 4,096 images): each
                query's residual below ``tol`` times its start, or ``max_iter`` steps.
        """
        return self._scores(self._queries(queries), queries is None, kq, tol, max_iter)

    def _queries(self, queries) -> np.ndarray:
        if queries is None:
            return self.gallery
        q = l2_normalize(as_matrix(queries, "queries"))
        if q.shape[1] != self.gallery.shape[1]:
            raise ValueError(f"'queries' has dimension {q.shape[1]} but the gallery has {self.gallery.shape[1]}: "
                             "they must match.")
        return q

    def _scores(self, q: np.ndarray, same: bool, kq: int | None, tol: float, max_iter: int) -> np.ndarray:
        n = len(self)
        kq = min(KQ, n - same) if kq is None else kq
        positive_int(kq, "kq")
        _number(tol, "tol", 0.0, 1.0, True, True)
        positive_int(max_iter, "max_iter")
        if kq > n - same:
            raise ValueError(f"The 'kq' parameter ({kq}) must be at most {n - same}, the gallery images a query can "
                             "have as neighbours.")
        D, I = knn(q, self.gallery, kq, distance="cosine", exclude_self=same)
        seeds = _weights(D, self.gamma)
        out = np.empty((len(q), n), np.float32)
        step = max(1, _BLOCK_BYTES // (8 * n))
        scale = 1.0 / np.sqrt(self.degree)
        for s in range(0, len(q), step):
            rows = np.arange(min(step, len(q) - s))
            if n <= _DENSE_MAX:  # f = inverse @ y, and y holds kq non-zeros per query
                y = sparse.csr_matrix((seeds[s:s + step].ravel(), I[s:s + step].ravel(),
                                       np.arange(0, len(rows) * kq + 1, kq)), shape=(len(rows), n))
                out[s:s + step] = (y @ self._dense_inverse()) * scale[None, :]  # the inverse is symmetric
            else:
                y = np.zeros((n, len(rows)))
                y[I[s:s + step], rows[:, None]] = seeds[s:s + step]
                out[s:s + step] = (self._solve(y, tol, max_iter) * scale[:, None]).T
        return out

    def distances(self, queries=None, kq: int | None = None) -> np.ndarray:
        """(nq, n) float32 distances in [0, 2], smaller is closer: ``1 - score / (2 x the row's
        largest score)``, in [0.5, 1), for the images the walk reaches, ``1 + cosine distance / 2``
        after them for the rest. ``queries=None``: leave-one-out, with 0 on the diagonal only, so
        each image comes first in its own row."""
        same = queries is None
        q = self._queries(queries)
        f = self._scores(q, same, kq, _TOL, _MAX_ITER)
        if same:
            np.fill_diagonal(f, 0.0)
        top = np.maximum(f.max(axis=1, keepdims=True), np.finfo(np.float32).tiny)
        cos = np.clip(pairwise_distances(q, self.gallery, "cosine"), 0.0, 2.0)
        out = np.where(f > 0, 1.0 - 0.5 * f / top, 1.0 + cos / 2.0).astype(np.float32)
        if same:
            np.fill_diagonal(out, 0.0)
        return out


def diffusion_distances(query, gallery=None, k: int | None = None, kq: int | None = None, alpha: float = ALPHA,
                        gamma: float = GAMMA) -> np.ndarray:
    """Diffused distances between ``query`` (nq, d) and ``gallery`` (ng, d) features, the
    counterpart of :func:`utils_cv.similarity.rerank.k_reciprocal_rerank`.

    Args:
        query, gallery: features. ``gallery=None``: the queries are their own gallery
            (leave-one-out); the result is (nq, nq) and its diagonal is each image against itself
            (``metrics.evaluate_distances(D, labels)`` leaves it out).
        k, alpha, gamma: the graph's (:class:`DiffusionGraph`); ``k=None`` sizes it for the gallery.
        kq: gallery neighbours that seed each query (None: 5, or fewer in a smaller gallery).

    Returns:
        (nq, ng) float32 distances, smaller is closer (rank with ``np.argsort(.., axis=1)``).
    """
    q = as_matrix(query, "query")
    g = None if gallery is None else as_matrix(gallery, "gallery")
    if g is not None and q.shape[1] != g.shape[1]:
        raise ValueError(f"'query' has dimension {q.shape[1]} but 'gallery' has {g.shape[1]}: they must match.")
    if g is None and len(q) < 2:
        raise ValueError(f"The 'query' parameter must hold at least 2 images to be its own gallery; got {len(q)}.")
    graph = DiffusionGraph(q if g is None else g, k=k, alpha=alpha, gamma=gamma)
    return graph.distances(None if g is None else q, kq=kq)
