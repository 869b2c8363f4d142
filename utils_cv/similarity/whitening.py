"""Training-free post-processing of features, learned on the collection itself (numpy only):
PCA whitening, alpha-weighted query expansion (alpha-QE) and database-side augmentation
(alpha-DBA). See :mod:`utils_cv.similarity.boosts` for all the training-free improvements and
what each is worth; :class:`~utils_cv.similarity.index.SimilarityIndex` stores a fitted
:class:`PCAWhitening` and applies it to queries.
"""
from __future__ import annotations

import numpy as np

from utils_cv.similarity._checks import as_matrix, positive_int
from utils_cv.similarity.distances import knn, l2_normalize

__all__ = ["PCAWhitening", "database_augmentation", "query_expansion"]


# ---------------------------------------------------------------------------- whitening
class PCAWhitening:
    """PCA whitening learned without labels: centre on the mean, rotate onto the principal
    axes, divide each by ``(eigenvalue + shrinkage * mean eigenvalue) ** power``, keep ``dim``
    axes, and L2-normalise. ``power`` 0.5 is full whitening; smaller values whiten partially.

    Fit it on the gallery (the collection searched) and apply it to gallery and queries alike.
    With n gallery vectors at most n - 1 axes carry variance, so ``dim`` is capped there.
    """

    def __init__(self, mean: np.ndarray, projection: np.ndarray):
        self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        self.projection = np.ascontiguousarray(projection, dtype=np.float32)
        if self.mean.ndim != 1 or self.projection.ndim != 2 or self.projection.shape[0] != len(self.mean):
            raise ValueError(f"PCAWhitening needs a (d,) mean and a (d, dim) projection; got {self.mean.shape} and "
                             f"{self.projection.shape}.")

    @classmethod
    def fit(cls, features, dim: int | None = None, power: float = 0.5, shrinkage: float = 0.1) -> "PCAWhitening":
        """Learn the whitening from ``features`` (n, d), n >= 2 rows.

        Args:
            dim: axes kept; None: min(d, n - 1).
            power: 0.5 divides each axis by its standard deviation; 0 only rotates.
            shrinkage: added to every eigenvalue as a share of their mean, so that axes of
                almost no variance are not blown up.
        """
        x = as_matrix(features, "features").astype(np.float64)
        n, d = x.shape
        if n < 2:
            raise ValueError(f"PCAWhitening.fit needs at least 2 feature rows; got {n}.")
        cap = min(d, n - 1)
        if dim is not None:
            positive_int(dim, "dim")
        dim = cap if dim is None else min(int(dim), cap)
        if isinstance(power, bool) or not 0 <= power <= 1:
            raise ValueError(f"The 'power' parameter must be in [0, 1]. Got {power!r} instead.")
        if isinstance(shrinkage, bool) or not shrinkage >= 0:
            raise ValueError(f"The 'shrinkage' parameter must be >= 0. Got {shrinkage!r} instead.")
        mean = x.mean(axis=0)
        # principal axes from the SVD of the centred rows (n may be far below d)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        eig = s[:dim] ** 2 / (n - 1)
        scale = (eig + shrinkage * eig.mean() + 1e-12) ** -power
        return cls(mean, (vt[:dim].T * scale[None, :]))

    @property
    def dim(self) -> int:
        """Dimension of the whitened features."""
        return self.projection.shape[1]

    @property
    def input_dim(self) -> int:
        """Dimension of the features it takes."""
        return len(self.mean)

    def __call__(self, features) -> np.ndarray:
        x = as_matrix(features, "features")
        if x.shape[1] != self.input_dim:
            raise ValueError(f"'features' has dimension {x.shape[1]}; this whitening was fitted on {len(self.mean)}.")
        return l2_normalize((x - self.mean) @ self.projection)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "projection": self.projection}

    @classmethod
    def from_arrays(cls, arrays) -> "PCAWhitening":
        return cls(arrays["mean"], arrays["projection"])


# ---------------------------------------------------------------------------- expansion
def _check_alpha_k(k, alpha, n: int, name: str) -> None:
    positive_int(k, "k")
    if k > n:
        raise ValueError(f"The 'k' parameter ({k}) is larger than the {n} rows of {name!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not alpha >= 0:
        raise ValueError(f"The 'alpha' parameter must be a number >= 0. Got {alpha!r} instead.")


def _expand(rows: np.ndarray, gallery: np.ndarray, D: np.ndarray, I: np.ndarray, alpha: float) -> np.ndarray:
    sim = np.clip(1.0 - D.astype(np.float64) ** 2 / 2.0, 0.0, None)  # unit rows: cosine from L2
    w = sim ** alpha
    out = rows.astype(np.float64) + np.einsum("nk,nkd->nd", w, gallery[I].astype(np.float64))
    return l2_normalize(out.astype(np.float32))


def query_expansion(queries, gallery, k: int = 2, alpha: float = 3.0, exclude_self: bool = False) -> np.ndarray:
    """alpha-QE: each query becomes the normalised sum of itself and its ``k`` nearest gallery
    rows, each weighted by ``cosine similarity ** alpha`` (negative similarities count 0).

    Args:
        queries, gallery: (nq, d) and (n, d) features; rows are L2-normalised first.
        exclude_self: query i is gallery row i (leave-one-out): never use it as its own neighbour.

    Returns:
        (nq, d) float32 unit rows; search the gallery with them as with the queries.
    """
    q, g = l2_normalize(as_matrix(queries, "queries")), l2_normalize(as_matrix(gallery, "gallery"))
    _check_alpha_k(k, alpha, len(g) - (1 if exclude_self else 0), "gallery")
    D, I = knn(q, g, k, exclude_self=exclude_self)
    return _expand(q, g, D, I, float(alpha))


def database_augmentation(features, k: int = 2, alpha: float = 3.0) -> np.ndarray:
    """alpha-DBA: every gallery row becomes the normalised sum of itself and its ``k`` nearest
    other rows weighted by ``cosine similarity ** alpha``. Index the result; queries then
    either go through :func:`query_expansion` against it or are searched as they are.

    Returns:
        (n, d) float32 unit rows, in the order of ``features``.
    """
    g = l2_normalize(as_matrix(features, "features"))
    _check_alpha_k(k, alpha, len(g) - 1, "features")
    D, I = knn(g, g, k, exclude_self=True)
    return _expand(g, g, D, I, float(alpha))
