"""The search backends of :class:`~utils_cv.similarity.index.SimilarityIndex`.

Kept apart from ``index.py`` (which holds the ids, removals and persistence) so that a backend
is data, not a branch in the index. Smaller distance means closer; ties break by the lower index.

``exact``: :class:`ExactRows` keeps the vectors in one growing array (capacity doubles, so
adding rows one batch at a time copies each row O(1) times) and searches it in place with
the kernels and tie rule of :func:`~utils_cv.similarity.distances.knn`: faiss' brute-force
``faiss.knn`` on the array itself when faiss is installed (no ``IndexFlat`` copy of the
gallery), blocked torch matrix products with cached squared norms otherwise. A one-query
search is one pass over the vectors.

Approximate backends are entries of :data:`FAISS_BACKENDS`: a ``faiss.index_factory`` string
whose ``{fields}`` are filled from the parameters (``",RFlat"`` appended when ``refine=True``:
exact re-ranking of a shortlist of k * k_factor), the other parameters set through faiss' own
``ParameterSpace``. A new backend is one entry, e.g. inverted lists of raw vectors::

    FAISS_BACKENDS["ivfflat"] = FaissBackend(
        "IVF{nlist},Flat", {"nlist": None, "nprobe": 8, "refine": False, "k_factor": 2},
        search=("nprobe", "k_factor"), effort="nprobe", effort_class="SearchParametersIVF",
        effort_limit="nlist", trained=True)

Besides ``exact``, ``hnsw`` and ``ivfpq`` of the design, ``ivfsq`` (inverted lists of 8-bit
scalar codes) was added: on 1M x 512 clustered vectors it was the only backend to reach
recall@10 0.95 at 100x the speed of exact search on 2 CPUs, because 8-bit codes rank almost
exactly where product-quantization codes need a long re-ranked shortlist (BENCHMARKS.md).

An approximate search never comes back with fewer than k answers: rows that do (too few
vectors in the ``nprobe`` probed cells, an HNSW walk that ended early) are searched again
with the effort parameter doubled, up to exhaustive (``nprobe = nlist``, ``efSearch`` = the
number of vectors), through ``faiss.SearchParameters*`` so the index's own settings stay;
HNSW rows still short (nodes no graph walk reaches) are then searched exhaustively in its
flat storage.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from utils_cv.similarity.distances import faiss_module, l2_normalize, sq_norms, squared_l2_

__all__ = ["BACKENDS", "FAISS_BACKENDS", "ExactRows", "FaissBackend", "build_faiss", "defaults", "faiss_search",
           "param_problem", "resolve_params", "set_faiss_params"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaissBackend:
    """One approximate backend: how faiss builds it and which parameters it takes.

    Attributes:
        factory: ``faiss.index_factory`` string; ``{name}`` fields are filled from the parameters.
        params: every parameter with its default; ``None`` is worked out from the data (``nlist``
            about 4 * sqrt(n), ``m`` d / 4 rounded to a divisor of d, at most 64). A ``refine``
            parameter appends ``",RFlat"`` when true; parameters that are not factory fields are set
            through ``faiss.ParameterSpace``.
        search: the parameters that may change after build.
        effort: the query-time parameter raised when a query finds fewer than k vectors.
        effort_class: the ``faiss.SearchParameters*`` class that carries ``effort`` for one search.
        effort_limit: the parameter bounding ``effort`` (None: the number of vectors).
        fallback: a flat sub-index searched exhaustively for queries still short at the highest
            effort (HNSW's ``storage``: nodes that no graph walk reaches).
        trained: needs a training sample (k-means of the inverted lists).
    """

    factory: str
    params: dict = field(default_factory=dict)
    search: tuple = ()
    effort: str | None = None
    effort_class: str = ""
    effort_limit: str | None = None
    fallback: str | None = None
    trained: bool = False


FAISS_BACKENDS = {
    # HNSW: M links per node, efConstruction at build, efSearch at query time
    "hnsw": FaissBackend("HNSW{M}", {"M": 32, "efConstruction": 200, "efSearch": 128}, search=("efSearch",),
                         effort="efSearch", effort_class="SearchParametersHNSW", fallback="storage"),
    # IVF-SQ8: nlist cells, nprobe searched, each vector stored as 8-bit integers per dimension
    # (a quarter of float32, distances within about 1 %); refine off: the codes rank almost exactly
    "ivfsq": FaissBackend("IVF{nlist},SQ8", {"nlist": None, "nprobe": 8, "refine": False, "k_factor": 2},
                          search=("nprobe", "k_factor"), effort="nprobe", effort_class="SearchParametersIVF",
                          effort_limit="nlist", trained=True),
    # IVF-PQ: m sub-quantizers of 8 bits ("np": no polysemous training, the plain IndexIVFPQ);
    # refine: exact re-ranking of k * k_factor candidates (False: the memory-lean mode, codes only)
    "ivfpq": FaissBackend("IVF{nlist},PQ{m}x8np", {"nlist": None, "nprobe": 8, "m": None, "refine": True,
                                                   "k_factor": 32},
                          search=("nprobe", "k_factor"), effort="nprobe", effort_class="SearchParametersIVF",
                          effort_limit="nlist", trained=True),
}
BACKENDS = ("exact", *FAISS_BACKENDS)
_FAISS_NAMES = {"k_factor": "k_factor_rf"}  # our parameter name -> faiss ParameterSpace name
MAX_INT_PARAM = 1 << 24  # far above any useful value, far below what overflows faiss' int
MAX_K_FACTOR = 1 << 16


def defaults(backend: str) -> dict:
    """The parameters ``backend`` takes, with their defaults (``exact``: none)."""
    return dict(FAISS_BACKENDS[backend].params) if backend in FAISS_BACKENDS else {}


def param_problem(name: str, value) -> str | None:
    """Why ``value`` is not valid for parameter ``name``, or None."""
    if name == "refine":
        return None if isinstance(value, bool) else "must be true or false"
    number = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    if name == "k_factor":
        return None if number and math.isfinite(value) and 1 <= value <= MAX_K_FACTOR else (
            f"must be a number in [1, {MAX_K_FACTOR}]")
    ok = number and isinstance(value, (int, np.integer)) and 1 <= value <= MAX_INT_PARAM
    return None if ok else f"must be an integer in [1, {MAX_INT_PARAM}]"


def resolve_params(backend: str, params: dict, n: int, d: int) -> dict:
    """``params`` over the backend's defaults, ``None`` worked out for n vectors of dimension d."""
    unknown = set(params) - set(defaults(backend))
    if unknown:
        raise ValueError(f"Unknown parameters {sorted(unknown)} for backend {backend!r}; "
                         f"it takes {sorted(defaults(backend))}.")
    merged = {**defaults(backend), **params}
    for name, value in merged.items():
        if value is None and name == "nlist":  # k-means wants >= 39 points per cell
            merged[name] = int(max(1, min(n // 39, round(4 * np.sqrt(n)))))
        elif value is None and name == "m":  # sub-quantizers: a divisor of d
            merged[name] = max(m for m in range(1, max(1, min(64, d // 4)) + 1) if d % m == 0)
        elif param_problem(name, value):
            raise ValueError(f"The {name!r} parameter {param_problem(name, value)}. Got {value!r} instead.")
    return merged


def set_faiss_params(idx, params: dict, names) -> None:
    """Set ``names`` of ``params`` on the faiss index through ``faiss.ParameterSpace``."""
    space = None
    for name in names:
        if name == "k_factor" and not params.get("refine"):
            continue  # only a refined index has a shortlist
        space = space or faiss_module().ParameterSpace()
        space.set_index_parameter(idx, _FAISS_NAMES.get(name, name), float(params[name]))


def build_faiss(backend: str, params: dict, dim: int, train: np.ndarray):
    """An empty, trained faiss index for ``backend`` (``train``: the vectors as they will be added)."""
    faiss = faiss_module()
    if faiss is None:
        raise ImportError(f"backend={backend!r} needs faiss: pip install faiss-cpu (or utils_cv[faiss]).")
    spec = FAISS_BACKENDS[backend]
    factory = spec.factory.format(**params) + (",RFlat" if params.get("refine") else "")
    idx = faiss.index_factory(dim, factory, faiss.METRIC_L2)
    set_faiss_params(idx, params, [n for n in params if "{" + n + "}" not in spec.factory and n != "refine"])
    if spec.trained:
        need = max(int(params["nlist"]), 256)
        if len(train) < need:
            raise ValueError(f"{backend} needs at least max(nlist, 256) = {need} vectors to train; got "
                             f"{len(train)}. Use backend='exact' or 'hnsw' for small sets.")
        # k-means needs about 40-256 points per cell; a seeded sample of 64 per cell keeps
        # training time flat in n (faiss itself would sample 256 per cell)
        limit = 64 * int(params["nlist"])
        if len(train) > limit:
            train = train[np.sort(np.random.default_rng(0).choice(len(train), limit, replace=False))]
        idx.train(train)
    return idx


def faiss_search(idx, backend: str, params: dict, q: np.ndarray, fetch: int, k: int, removed: set[int]):
    """``idx.search(q, fetch)``, rows with fewer than k live answers searched again with more
    effort up to exhaustive; RuntimeError if still short. Returns faiss' (D, I) (squared L2)."""
    faiss, spec = faiss_module(), FAISS_BACKENDS[backend]
    D, I = idx.search(q, fetch)
    dead = np.fromiter(removed, np.int64, len(removed))

    def short_rows():
        return np.nonzero(((I >= 0) & ~np.isin(I, dead)).sum(1) < k)[0]

    effort = int(params[spec.effort])
    ceiling = int(params[spec.effort_limit]) if spec.effort_limit else idx.ntotal
    short = short_rows()
    while len(short) and effort < ceiling:
        effort = min(2 * effort, ceiling)
        sp = getattr(faiss, spec.effort_class)(**{spec.effort: effort})
        if params.get("refine"):
            sp = faiss.IndexRefineSearchParameters(k_factor=float(params["k_factor"]), base_index_params=sp)
        D[short], I[short] = idx.search(q[short], fetch, params=sp)
        log.debug("%d queries found fewer than k=%d; searched again with %s=%d", len(short), k, spec.effort, effort)
        short = short_rows()
    if len(short) and spec.fallback:
        flat = faiss.downcast_index(getattr(faiss.downcast_index(idx), spec.fallback))
        D[short], I[short] = flat.search(q[short], fetch)
        log.debug("%d queries searched exhaustively through %s", len(short), spec.fallback)
        short = short_rows()
    if len(short):
        raise RuntimeError(f"{len(short)} queries found fewer than k={k} items even with {spec.effort}={effort} "
                           "(exhaustive): some vectors are unreachable in this index; rebuild it.")
    return D, I


def _append(buf: np.ndarray, start: int, rows: np.ndarray) -> np.ndarray:
    """``rows`` written at ``start`` of ``buf`` (whose first ``start`` rows are kept); the buffer
    doubles when full, so n single-row appends copy O(n) rows in all, not O(n^2)."""
    if start + len(rows) > len(buf):
        grown = np.empty((max(start + len(rows), 2 * len(buf)),) + buf.shape[1:], np.float32)
        grown[:start] = buf[:start]
        buf = grown
    buf[start:start + len(rows)] = rows
    return buf


class ExactRows:
    """The exact backend's vectors: a growing (n, d) float32 array searched in place.

    Derived rows (squared norms, unit rows for cosine) are computed on first use and then
    kept in step with :meth:`append`.
    """

    def __init__(self, rows: np.ndarray):
        self._buf, self.n = rows, len(rows)  # taken as is: the caller hands over an array it owns
        self._cache: dict = {}

    @property
    def rows(self) -> np.ndarray:
        """(n, d) float32, a view of the buffer (no copy)."""
        return self._buf[:self.n]

    def append(self, x: np.ndarray) -> None:
        self._buf = _append(self._buf, self.n, x)
        for key, derive in (("sq", sq_norms), ("unit", l2_normalize)):
            if key in self._cache:
                self._cache[key] = _append(self._cache[key], self.n, derive(x))
        self.n += len(x)

    def _derived(self, key: str) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = sq_norms(self.rows) if key == "sq" else l2_normalize(self.rows)
        return self._cache[key][:self.n]

    def search(self, q: np.ndarray, fetch: int, distance: str) -> tuple[np.ndarray, np.ndarray]:
        """The answers of :func:`~utils_cv.similarity.distances.knn` (same kernels, same tie rule)."""
        cosine = distance == "cosine"
        r = self._derived("unit") if cosine else self.rows
        q = l2_normalize(q) if cosine else q
        window = min(len(r), fetch + 8)
        faiss = faiss_module()
        if faiss is not None:
            Dc, Ic = faiss.knn(q, r, window, metric=faiss.METRIC_INNER_PRODUCT if cosine else faiss.METRIC_L2)
            Dc = 1.0 - Dc if cosine else np.sqrt(np.maximum(Dc, 0.0))
        else:
            Dc, Ic = self._torch_candidates(q, r, window, cosine)
        order = np.lexsort((Ic, Dc), axis=1)
        Dc, Ic = np.take_along_axis(Dc, order, 1), np.take_along_axis(Ic, order, 1)
        D, I = Dc[:, :fetch].astype(np.float32), Ic[:, :fetch].astype(np.int64)
        if window < len(r):  # a tie at the window's edge may hide a lower index: redo that row fully
            for i in np.nonzero(Dc[:, fetch - 1] >= Dc.max(axis=1))[0]:
                prod = q[i][None, :] @ r.T
                d = (np.subtract(1.0, prod, out=prod) if cosine else
                     np.sqrt(squared_l2_(prod, sq_norms(q[i][None, :]), self._derived("sq")), out=prod))[0]
                best = np.lexsort((np.arange(len(d)), d))[:fetch]
                D[i], I[i] = d[best], best
        return D, I

    def _torch_candidates(self, q, r, window, cosine):
        import torch

        rt = torch.from_numpy(r)
        rt_sq = None if cosine else torch.from_numpy(self._derived("sq"))
        D, I = np.empty((len(q), window), np.float32), np.empty((len(q), window), np.int64)
        step = int(max(1, (256 << 20) // (4 * len(r))))  # a block of distances stays under 256 MB
        with torch.inference_mode():
            for s in range(0, len(q), step):
                qb = torch.from_numpy(q[s:s + step])
                prod = qb @ rt.T
                d = prod.neg_().add_(1.0) if cosine else squared_l2_(prod, sq_norms(qb), rt_sq)
                vals, inds = torch.topk(d, window, dim=1, largest=False, sorted=False)
                D[s:s + step] = vals.numpy() if cosine else np.sqrt(vals.numpy())
                I[s:s + step] = inds.numpy()
        return D, I
