"""k-reciprocal re-ranking (Zhong, Zheng, Cao & Li, "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017).

Idea: two images are truly close when each is among the other's nearest neighbours. For
every image p of the query set and gallery together:

1. ``N(p, k1)``: its k1 nearest neighbours (itself included, as rank 0);
   ``R(p, k1) = {g in N(p, k1) : p in N(g, k1)}``, the k-reciprocal neighbours.
2. Expansion: ``R*(p) = R(p, k1) ∪ R(c, k1/2)`` for each ``c`` in ``R(p, k1)`` whose own
   half-size reciprocal set overlaps ``R(p, k1)`` in more than 2/3 of its members.
3. ``V_p``: a vector over all images, ``exp(-d(p, g))`` on ``R*(p)``, 0 elsewhere,
   normalised to sum 1 (the authors' code; the paper leaves it unnormalised).
4. Local query expansion: ``V_p`` becomes the mean of ``V_g`` over ``N(p, k2)``.
5. Jaccard distance ``d_J(p, g) = 1 - Σ min(V_p, V_g) / Σ max(V_p, V_g)``.
6. Final distance ``(1 - λ) d_J + λ d``.

``d`` is the squared Euclidean distance divided by its largest value in each row (over the
query set and gallery together), as in the authors' reference code, so both terms lie in
[0, 1]. Nearest-neighbour lists come from blocked exact search (``index.knn``) and ``V`` is
sparse (at most a few times k1 non-zeros per row), so memory grows with
``(nq + ng) * k1`` rather than ``(nq + ng)^2``; the output itself is the dense (nq, ng)
matrix.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from utils_cv.similarity._checks import as_matrix, check_labels, positive_int
from utils_cv.similarity.distances import knn, sq_norms, squared_l2_

__all__ = ["K1S", "K2S", "LAMBDAS", "RerankChoice", "choose_parameters", "k_reciprocal_rerank"]

log = logging.getLogger(__name__)
_BLOCK_BYTES = 128 * 1024 * 1024
# choose_parameters' default grid: the paper's values and around them
K1S = (10, 20, 30, 50)
K2S = (1, 3, 6)
# 1.0: the original ranking. Not 0: the Jaccard distance alone ties every image outside a
# query's reciprocal neighbourhood, so classes larger than it rank at random (ImageNet features
# on openclipart, 125 images a class: MAP@R 0.43 at k1 30 against 0.65 without re-ranking)
LAMBDAS = tuple(i / 10 for i in range(1, 11))


def _check(k1, k2, lambda_value, n):
    positive_int(k1, "k1")
    positive_int(k2, "k2")
    if k2 > k1 + 1:
        raise ValueError(f"The 'k2' parameter ({k2}) must be at most k1 + 1 = {k1 + 1}.")
    if k1 + 1 > n:
        raise ValueError(f"The 'k1' parameter ({k1}) needs more than k1 = {k1} images in the query set and "
                         f"gallery together; got {n}. Lower k1.")
    if isinstance(lambda_value, (bool, np.bool_)) or not isinstance(lambda_value, (int, float, np.integer, np.floating)) \
            or not 0 <= lambda_value <= 1:
        raise ValueError(f"The 'lambda_value' parameter must be a number in [0, 1]. Got {lambda_value!r} instead.")


def _neighbours(x: np.ndarray, k: int) -> np.ndarray:
    """(n, k + 1) indices: each row itself first, then its k nearest others (ties: lower index)."""
    _, I = knn(x, x, k, exclude_self=True)
    return np.concatenate([np.arange(len(x))[:, None], I], axis=1)


def _reciprocal(rank: np.ndarray, i: int, k: int) -> np.ndarray:
    forward = rank[i, : k + 1]
    back = rank[forward, : k + 1]
    return forward[(back == i).any(axis=1)]


def _row_max_sq(x: np.ndarray) -> np.ndarray:
    """Largest squared distance of each row to all rows, in blocks."""
    sq = sq_norms(x)
    out = np.empty(len(x), np.float32)
    step = max(1, _BLOCK_BYTES // (4 * len(x)))
    for s in range(0, len(x), step):
        d = squared_l2_(x[s:s + step] @ x.T, sq[s:s + step], sq)
        out[s:s + step] = np.maximum(d.max(1), 1e-12)
    return out


def k_reciprocal_rerank(query, gallery=None, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    """Re-ranked distances between ``query`` (nq, d) and ``gallery`` (ng, d) features.

    Args:
        query, gallery: features, e.g. from ``features.extract_features`` (L2-normalised or not).
            ``gallery=None``: the queries are their own gallery (leave-one-out evaluation);
            the result is (nq, nq) and its diagonal is each image against itself
            (``metrics.evaluate_distances(D, labels)`` leaves it out).
        k1: neighbourhood size of the k-reciprocal sets (20 in the paper).
        k2: neighbours averaged in the local query expansion (6; 1 turns it off).
        lambda_value: weight of the original distance (0.3); 1 gives back the original
            ranking, 0 the Jaccard distance alone. :func:`choose_parameters` picks the three
            on labelled images.

    Returns:
        (nq, ng) float32 distances, smaller is closer (rank with ``np.argsort(.., axis=1)``).
    """
    shape, rows = _rows(query, gallery, k1, k2, lambda_value)
    out = np.empty(shape, np.float32)
    for i, jaccard, d in rows:
        out[i] = (1.0 - lambda_value) * jaccard + lambda_value * d
    return out


def _rows(query, gallery, k1, k2, lambda_value=0.3):
    """The output's shape (nq, ng) and a generator of ``(i, Jaccard distances, row-normalised
    squared distances)`` for each query ``i``: what the final distance mixes."""
    q = as_matrix(query, "query")
    same = gallery is None
    g = q if same else as_matrix(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"'query' has dimension {q.shape[1]} but 'gallery' has {g.shape[1]}: they must match.")
    if len(q) == 0 or len(g) == 0:
        raise ValueError("'query' and 'gallery' must each hold at least one row.")
    x = q if same else np.concatenate([q, g])
    n, nq = len(x), len(q)
    _check(k1, k2, lambda_value, n)
    from scipy import sparse

    row_max = _row_max_sq(x)
    rank = _neighbours(x, k1)  # (n, k1 + 1)
    half = int(np.around(k1 / 2))
    rows, cols, vals = [], [], []
    for i in range(n):
        r = _reciprocal(rank, i, k1)
        expanded = [r]
        for c in r:
            rc = _reciprocal(rank, int(c), half)
            if len(np.intersect1d(rc, r)) > 2 / 3 * len(rc):
                expanded.append(rc)
        members = np.unique(np.concatenate(expanded))
        d = ((x[members] - x[i]) ** 2).sum(1) / row_max[i]
        w = np.exp(-d)
        rows.append(np.full(len(members), i))
        cols.append(members)
        vals.append(w / w.sum())
    V = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n),
                          dtype=np.float64)
    if k2 > 1:  # local query expansion: mean of the k2 nearest rows (itself first)
        Q = sparse.csr_matrix((np.full(n * k2, 1.0 / k2), (np.repeat(np.arange(n), k2), rank[:, :k2].ravel())),
                              shape=(n, n))
        V = (Q @ V).tocsr()
    Vc = V.tocsc()
    gal = np.arange(n) if same else np.arange(nq, n)
    sq_g = sq_norms(g)

    def rows():
        for i in range(nq):
            start, stop = V.indptr[i], V.indptr[i + 1]
            nz, vi = V.indices[start:stop], V.data[start:stop]
            # Σ_j min(V_i, V_g) over the columns where V_i is non-zero (elsewhere min is 0)
            sub = Vc[:, nz].tocsr()[gal]  # (ng, |nz|) sparse; its column j is image nz[j]
            sub.data = np.minimum(sub.data, vi[sub.indices])
            mins = np.asarray(sub.sum(1)).ravel()
            # rows of V sum to 1, so Σ max = 2 - Σ min
            yield i, 1.0 - mins / (2.0 - mins), squared_l2_((g @ q[i])[None, :], sq_norms(q[i:i + 1]), sq_g)[0] / row_max[i]

    return (nq, len(g)), rows()


@dataclass
class RerankChoice:
    """The parameters with the best MAP@R (``k1``, ``k2``, ``lambda_value``: pass them on as
    ``k_reciprocal_rerank(..., **choice.params)``) and the MAP@R of every combination tried,
    keyed by ``(k1, k2, lambda_value)``."""

    params: dict
    scores: dict


def choose_parameters(features, labels: Sequence[str], k1s: Sequence[int] = K1S, k2s: Sequence[int] = K2S,
                      lambdas: Sequence[float] = LAMBDAS) -> RerankChoice:
    """The re-ranking parameters that give labelled images (e.g. a model's retrieval
    validation, :func:`utils_cv.similarity.robust.choose_rerank`) their best leave-one-out
    MAP@R, among every combination of ``k1s``, ``k2s`` and ``lambdas``.

    The best ``k1`` grows with the number of images per class (it is the neighbourhood in
    which reciprocal neighbours are looked for), which is why a fixed one rarely suits a new
    collection. ``lambda_value = 1`` (in the default grid) is the original ranking, so on
    these images the choice never scores below no re-ranking; 0 is not in it (see
    :data:`LAMBDAS`). Ties go to the larger ``lambda_value``, then the smaller ``k1`` and
    ``k2``. A ``k1`` too large for the number of images is lowered to ``n - 1`` (as
    :func:`utils_cv.similarity.experiment.evaluate` does); a ``k2 > k1 + 1`` is skipped. It
    holds two (n, n) float64 matrices at a time: meant for validation sets (hundreds to a few
    thousand images).

    Raises:
        ValueError: features and labels disagree in length, no class has two images, or the
            grid holds no possible combination.
    """
    from utils_cv.similarity import metrics

    x = as_matrix(features, "features")
    labels = check_labels(labels, "labels", len(x))
    if len(set(labels)) == len(labels):
        raise ValueError("'labels' must hold at least one class with two images to score a ranking.")
    for name, values in (("k1s", k1s), ("k2s", k2s), ("lambdas", lambdas)):
        if len(values) == 0:
            raise ValueError(f"The '{name}' parameter is empty: give at least one value.")
    for v in list(k1s) + list(k2s):
        positive_int(v, "k1s / k2s")
    for v in lambdas:
        _check(1, 1, v, 2)  # the lambda check of k_reciprocal_rerank
    lambdas = sorted({float(v) for v in lambdas})
    k1s = sorted({min(int(a), len(x) - 1) for a in k1s})  # lowered to what the images allow
    combos = [(a, int(b)) for a in k1s for b in sorted(set(k2s)) if b <= a + 1]
    if not combos:
        raise ValueError(f"No k2 in {sorted(set(k2s))!r} is at most k1 + 1 for a k1 in {k1s!r} (k1 lowered to "
                         f"n - 1 = {len(x) - 1} where larger): pass smaller 'k2s'.")
    scores = {}
    for k1, k2 in combos:
        shape, rows = _rows(x, None, k1, k2)
        jaccard, d = np.empty(shape), np.empty(shape, np.float32)  # d: float32, as k_reciprocal_rerank mixes it
        for i, jaccard_i, d_i in rows:
            jaccard[i], d[i] = jaccard_i, d_i
        for lam in lambdas:
            mixed = ((1.0 - lam) * jaccard + lam * d).astype(np.float32)
            scores[(k1, k2, lam)] = metrics.evaluate_distances(mixed, labels, ks=(1,))["map@r"]
    best = max(scores, key=lambda key: (scores[key], key[2], -key[0], -key[1]))
    log.info("re-ranking: best MAP@R %.4f at k1 %d, k2 %d, lambda %.2f (%d combinations tried)", scores[best], *best,
             len(scores))
    return RerankChoice(dict(k1=best[0], k2=best[1], lambda_value=best[2]), scores)
