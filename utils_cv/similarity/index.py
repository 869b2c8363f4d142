"""Nearest-neighbour search. Smaller distance means closer; ties break by the lower index.

``knn`` is exact search over arrays; ``SimilarityIndex`` keeps features with ids, searches
them exactly or approximately, and saves them. Besides the ``exact``, ``hnsw`` and ``ivfpq``
backends of the design, ``ivfsq`` (inverted lists of 8-bit scalar codes) was added: on
1M x 512 clustered vectors it was the only backend to reach recall@10 0.95 at 100x the
speed of exact search on 2 CPUs, because 8-bit codes rank almost exactly where product
quantization codes need a long re-ranked shortlist (BENCHMARKS.md).
"""
from __future__ import annotations

from pathlib import Path

import logging

import numpy as np

__all__ = ["BACKENDS", "DISTANCES", "SimilarityIndex", "clustered_vectors", "knn", "pairwise_distances",
           "sweep_search_params"]

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


def _positive_int(value, name: str) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an int >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"The {name!r} parameter must be a positive integer. Got {value!r} instead.")


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
    if len(q) == 0:
        raise ValueError("The 'query' parameter is empty: give at least one row.")
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
    if nq == 0:
        raise ValueError("The 'query' parameter is empty: give at least one row.")
    if exclude_self and nq != nr:
        raise ValueError(f"exclude_self=True needs query and reference to be the same rows; got {nq} and {nr} rows.")
    available = nr - 1 if exclude_self else nr
    _positive_int(k, "k")
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


# ---------------------------------------------------------------------------- persistent index
BACKENDS = ("exact", "hnsw", "ivfsq", "ivfpq")
_DEFAULTS = {
    "exact": {},
    # HNSW: M links per node, efConstruction at build, efSearch at query time
    "hnsw": {"M": 32, "efConstruction": 200, "efSearch": 128},
    # IVF-PQ: nlist cells (None: about 4 * sqrt(n)), nprobe cells searched, m sub-quantizers of
    # 8 bits (None: d / 4 rounded to a divisor of d, at most 64), refine: exact re-ranking of a
    # shortlist of k * k_factor candidates (False: the memory-lean mode, codes only)
    "ivfpq": {"nlist": None, "nprobe": 8, "m": None, "refine": True, "k_factor": 32},
    # IVF-SQ8: nlist cells, nprobe searched, each vector stored as 8-bit integers per
    # dimension (a quarter of float32, distances within about 1 %); refine as for ivfpq, off by
    # default since the codes are already close to exact
    "ivfsq": {"nlist": None, "nprobe": 8, "refine": False, "k_factor": 2},
}
_FORMAT = "utils_cv.similarity.index/1"


def _encode_id(i):
    """ids.json holds str / int / float ids as themselves, paths and tuples tagged."""
    if isinstance(i, Path):
        return {"path": str(i)}
    if isinstance(i, tuple):
        return {"tuple": [_encode_id(j) for j in i]}
    if isinstance(i, (np.integer, np.str_)):
        return i.item()
    if i is None or isinstance(i, (str, int, float)):
        return i
    raise TypeError(f"Index ids must be str, int, float, pathlib.Path or tuples of them to be saved; got {type(i).__name__}.")


def _decode_id(i):
    if isinstance(i, dict):
        return Path(i["path"]) if "path" in i else tuple(_decode_id(j) for j in i["tuple"])
    return tuple(i) if isinstance(i, list) else i


def _pq_m(d: int) -> int:
    target = max(1, min(64, d // 4))
    return max(m for m in range(1, target + 1) if d % m == 0)


class SimilarityIndex:
    """Nearest-neighbour search over features with ids, exact or approximate, saved to disk.

    Build with :meth:`build`; ``search`` returns distances (smaller is closer) and the ids
    given at build / :meth:`add` time. Removed ids never come back: they are filtered out of
    every answer (the approximate indexes keep them until :meth:`rebuild`).
    """

    def __init__(self, backend: str, distance: str, dim: int, params: dict, metadata: dict | None = None):
        self.backend, self.distance, self.dim = backend, distance, dim
        self.params = params
        self.metadata = dict(metadata or {})
        self._ids: list = []
        self._row_of: dict = {}
        self._removed: set[int] = set()
        self._features: np.ndarray | None = np.empty((0, dim), np.float32) if backend == "exact" else None
        self._faiss = None

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, features, ids, backend: str = "exact", distance: str = "l2", metadata: dict | None = None,
              **params) -> "SimilarityIndex":
        """Index ``features`` (n, d) under ``ids`` (n hashable ids, e.g. file paths).

        Args:
            backend: ``"exact"`` (blocked brute force, :func:`knn`), ``"hnsw"``, ``"ivfsq"`` or
                ``"ivfpq"`` (faiss; ``pip install faiss-cpu``).
            distance: ``"l2"`` or ``"cosine"``.
            metadata: what made the features (backbone, preprocessing...), saved with the index.
            **params: backend parameters; defaults in ``_DEFAULTS`` (hnsw: M=32,
                efConstruction=200, efSearch=128; ivfsq: nlist=4*sqrt(n), nprobe=8,
                refine=False; ivfpq: nlist=4*sqrt(n), nprobe=8, m=d/4, refine=True,
                k_factor=32).
        """
        if backend not in BACKENDS:
            raise ValueError(f"The 'backend' parameter must be one of {set(BACKENDS)}. Got {backend!r} instead.")
        _check_distance(distance)
        x = _as_matrix(features, "features")
        unknown = set(params) - set(_DEFAULTS[backend])
        if unknown:
            raise ValueError(f"Unknown parameters {sorted(unknown)} for backend {backend!r}; "
                             f"it takes {sorted(_DEFAULTS[backend])}.")
        merged = {**_DEFAULTS[backend], **params}
        if backend in ("ivfpq", "ivfsq"):
            if merged["nlist"] is None:
                merged["nlist"] = int(max(1, min(len(x) // 39, round(4 * np.sqrt(len(x))))))
        if backend == "ivfpq":
            if merged["m"] is None:
                merged["m"] = _pq_m(x.shape[1])
        index = cls(backend, distance, x.shape[1], merged, metadata)
        if backend != "exact":
            index._faiss = index._new_faiss(x)
        index.add(x, ids)
        return index

    def _prepared(self, x: np.ndarray) -> np.ndarray:
        if self.distance == "cosine":
            return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), dtype=np.float32)
        return x

    def _new_faiss(self, train: np.ndarray):
        faiss = _faiss()
        if faiss is None:
            raise ImportError(f"backend={self.backend!r} needs faiss: pip install faiss-cpu (or utils_cv[faiss]).")
        p = self.params
        if self.backend == "hnsw":
            idx = faiss.IndexHNSWFlat(self.dim, int(p["M"]))
            idx.hnsw.efConstruction = int(p["efConstruction"])
            idx.hnsw.efSearch = int(p["efSearch"])
            return idx
        quantizer = faiss.IndexFlatL2(self.dim)
        if self.backend == "ivfsq":
            ivf = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, int(p["nlist"]), faiss.ScalarQuantizer.QT_8bit,
                                                faiss.METRIC_L2)
        else:
            ivf = faiss.IndexIVFPQ(quantizer, self.dim, int(p["nlist"]), int(p["m"]), 8)
        ivf.nprobe = int(p["nprobe"])
        train = self._prepared(train)
        if len(train) < max(int(p["nlist"]), 256):
            raise ValueError(f"{self.backend} needs at least max(nlist, 256) = {max(int(p['nlist']), 256)} vectors to "
                             f"train; got {len(train)}. Use backend='exact' or 'hnsw' for small sets.")
        # k-means needs about 40-256 points per cell; a seeded sample of 64 per cell keeps
        # training time flat in n (faiss itself would sample 256 per cell)
        limit = 64 * int(p["nlist"])
        if len(train) > limit:
            train = train[np.sort(np.random.default_rng(0).choice(len(train), limit, replace=False))]
        ivf.train(train)
        if not p["refine"]:
            return ivf
        refined = faiss.IndexRefineFlat(ivf)
        refined.k_factor = float(p["k_factor"])
        return refined

    _SEARCH_PARAMS = {"exact": (), "hnsw": ("efSearch",), "ivfpq": ("nprobe", "k_factor"),
                      "ivfsq": ("nprobe", "k_factor")}

    def set_search_params(self, **params) -> None:
        """Change query-time parameters without rebuilding: ``efSearch`` (hnsw), ``nprobe``
        and ``k_factor`` (ivfsq, ivfpq; ``k_factor`` only with ``refine=True``). Higher values find
        more of the true neighbours and answer more slowly; :meth:`recommend` measures both."""
        allowed = self._SEARCH_PARAMS[self.backend]
        unknown = set(params) - set(allowed)
        if unknown:
            raise ValueError(f"Unknown search parameters {sorted(unknown)} for backend {self.backend!r}; "
                             f"it takes {list(allowed) or 'none'}.")
        for name, value in params.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or value < 1:
                raise ValueError(f"The {name!r} parameter must be a number >= 1. Got {value!r} instead.")
        if "k_factor" in params and not self.params.get("refine"):
            raise ValueError("'k_factor' applies only to an ivfsq or ivfpq index built with refine=True.")
        self.params.update(params)
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        faiss = _faiss()
        p = self.params
        if self.backend == "hnsw":
            self._faiss.hnsw.efSearch = int(p["efSearch"])
        elif self.backend in ("ivfpq", "ivfsq"):
            ivf = faiss.extract_index_ivf(self._faiss)
            ivf.nprobe = int(p["nprobe"])
            if p.get("refine"):
                faiss.downcast_index(self._faiss).k_factor = float(p["k_factor"])

    # ------------------------------------------------------------------ contents
    def __len__(self) -> int:
        return len(self._ids) - len(self._removed)

    def add(self, features, ids) -> None:
        """Add rows; ``ids`` must be new (an id removed earlier may be added again)."""
        x = _as_matrix(features, "features")
        ids = list(ids)
        if len(ids) != len(x):
            raise ValueError(f"'ids' has {len(ids)} items but 'features' has {len(x)} rows: they must be aligned.")
        if x.shape[1] != self.dim:
            raise ValueError(f"'features' has dimension {x.shape[1]}; this index holds dimension {self.dim}.")
        if len(set(ids)) != len(ids):
            raise ValueError("'ids' contains duplicates: each id names one item.")
        clash = [i for i in ids if i in self._row_of]
        if clash:
            raise ValueError(f"ids already in the index: {clash[:3]}; remove them first.")
        start = len(self._ids)
        if self.backend == "exact":
            self._features = np.concatenate([self._features, x])
        else:
            self._faiss.add(self._prepared(x))
        for j, i in enumerate(ids):
            self._row_of[i] = start + j
        self._ids.extend(ids)

    def _id_array(self) -> np.ndarray:
        """The ids as an object array, rebuilt only when rows were added."""
        cached = self.__dict__.get("_ids_cache")
        if cached is None or len(cached) != len(self._ids):
            cached = np.empty(len(self._ids), dtype=object)
            cached[:] = self._ids
            self._ids_cache = cached
        return cached

    def remove(self, ids) -> int:
        """Remove items by id; returns how many were removed. Unknown ids raise KeyError."""
        ids = list(ids)
        missing = [i for i in ids if i not in self._row_of]
        if missing:
            raise KeyError(f"ids not in the index: {missing[:3]}")
        for i in ids:
            self._removed.add(self._row_of.pop(i))
        return len(ids)

    # ------------------------------------------------------------------ search
    def search(self, query, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest items of each query row.

        Returns:
            ``(D, ids)``: (nq, k) float32 distances, ascending, and an (nq, k) object array of
            the ids given at build time.
        """
        q = _as_matrix(query, "query")
        if len(q) == 0:
            raise ValueError("The 'query' parameter is empty: give at least one row.")
        if q.shape[1] != self.dim:
            raise ValueError(f"'query' has dimension {q.shape[1]} but the index holds dimension {self.dim} "
                             f"(features of {self.metadata.get('backbone', 'another model')!r}?).")
        _positive_int(k, "k")
        if k > len(self):
            raise ValueError(f"The 'k' parameter ({k}) is larger than the {len(self)} items in the index.")
        fetch = min(len(self._ids), k + len(self._removed))
        if self.backend == "exact":
            D, I = knn(q, self._features, fetch, distance=self.distance)
        else:
            D, I = self._faiss.search(self._prepared(q), fetch)
            D = np.sqrt(np.maximum(D, 0.0)) if self.distance == "l2" else np.maximum(D, 0.0) / 2.0
        if not self._removed and (I[:, :k] >= 0).all():  # the common case, without a Python loop per row
            return np.ascontiguousarray(D[:, :k], dtype=np.float32), self._id_array()[I[:, :k]]
        out_d = np.full((len(q), k), np.inf, dtype=np.float32)
        out_i = np.empty((len(q), k), dtype=object)
        for r in range(len(q)):
            keep = [(d, i) for d, i in zip(D[r], I[r]) if i >= 0 and int(i) not in self._removed][:k]
            for c, (d, i) in enumerate(keep):
                out_d[r, c], out_i[r, c] = d, self._ids[int(i)]
        return out_d, out_i

    # ------------------------------------------------------------------ choosing a backend
    @classmethod
    def recommend(cls, features, target_recall: float = 0.95, k: int = 10, num_queries: int = 500,
                  distance: str = "l2", candidates: list[tuple[str, dict]] | None = None, seed: int = 0) -> dict:
        """Measure recall@k against exact search and queries per second of each candidate on
        the user's own features; recommend the fastest that reaches ``target_recall``.

        Queries are ``num_queries`` rows of ``features`` (their own entry left out of the
        answers). Returns ``{"backend", "params", "table"}``; ``table`` has one dict per
        candidate (backend, params, build_s, qps, recall@k) and is also logged.
        """
        import logging
        import time

        log = logging.getLogger(__name__)
        x = _as_matrix(features, "features")
        if not 0 < target_recall <= 1:
            raise ValueError(f"The 'target_recall' parameter must be in (0, 1]. Got {target_recall!r} instead.")
        if len(x) <= k + 1:
            raise ValueError(f"recommend needs more than k + 1 = {k + 1} features; got {len(x)}.")
        rng = np.random.default_rng(seed)
        qi = rng.choice(len(x), size=min(num_queries, len(x)), replace=False)
        ids = list(range(len(x)))
        if candidates is None:
            candidates = [("exact", {}), ("hnsw", {}), ("hnsw", {"efSearch": 256})]
            if len(x) >= 256 * 4:
                candidates += [("ivfsq", {}), ("ivfsq", {"nprobe": 4}), ("ivfpq", {}), ("ivfpq", {"refine": False})]
            if _faiss() is None:
                candidates = [("exact", {})]

        def answers(index):
            t = time.perf_counter()
            _, got = index.search(x[qi], k + 1)
            seconds = time.perf_counter() - t
            return [[i for i in row if i != q][:k] for row, q in zip(got.tolist(), qi)], seconds

        table, truth = [], None
        for backend, params in [("exact", {})] + [c for c in candidates if c != ("exact", {})]:
            t = time.perf_counter()
            index = cls.build(x, ids, backend=backend, distance=distance, **params)
            build_s = time.perf_counter() - t
            got, seconds = answers(index)
            if truth is None:
                truth = got
            recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth)]))
            row = {"backend": backend, "params": params, "build_s": build_s, "qps": len(qi) / seconds,
                   f"recall@{k}": recall}
            if (backend, params) in candidates or backend == "exact":
                table.append(row)
            log.info("%-6s %-28s build %7.2f s  %9.0f queries/s  recall@%d %.3f", backend, params, build_s,
                     row["qps"], k, recall)
        good = [r for r in table if r[f"recall@{k}"] >= target_recall]
        best = max(good, key=lambda r: r["qps"]) if good else max(table, key=lambda r: r[f"recall@{k}"])
        return {"backend": best["backend"], "params": best["params"], "table": table}

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> Path:
        """Write the index to the folder ``path``: ``manifest.json`` (backend, parameters,
        dimension, distance, metadata, versions, sha256 of each file), ``ids.json`` and the
        vectors (``features.npy`` or ``index.faiss``). The folder is written beside the target
        and swapped in at the end: a crash mid-save leaves the previous index as it was."""
        import hashlib
        import json
        import shutil
        import tempfile

        from utils_cv.common.versions import library_versions

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            files = {}
            alive = [r for r in range(len(self._ids)) if r not in self._removed]
            (tmp / "ids.json").write_text(json.dumps({"ids": [_encode_id(i) for i in self._ids],
                                                      "removed": sorted(self._removed)}))
            files["ids.json"] = None
            if self.backend == "exact":
                np.save(tmp / "features.npy", self._features)
                files["features.npy"] = None
            else:
                faiss = _faiss()
                faiss.write_index(self._faiss, str(tmp / "index.faiss"))
                files["index.faiss"] = None
            for name in files:
                files[name] = hashlib.sha256((tmp / name).read_bytes()).hexdigest()
            manifest = {"format": _FORMAT, "backend": self.backend, "distance": self.distance, "dim": self.dim,
                        "params": self.params, "metadata": self.metadata, "count": len(alive),
                        "versions": library_versions("numpy", "faiss"), "sha256": files}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                if old.exists():
                    shutil.rmtree(old)
                path.rename(old)
            tmp.rename(path)
            if old is not None:
                shutil.rmtree(old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path, backbone: str | None = None) -> "SimilarityIndex":
        """Read an index written by :meth:`save`, checking every file's checksum.

        Args:
            backbone: when given, refuse an index whose features came from another backbone.
        """
        import hashlib
        import json

        path = Path(path)
        if not (path / "manifest.json").is_file():
            old = path.with_name(f".{path.name}.old")
            if not path.exists() and (old / "manifest.json").is_file():
                # a save was killed between its two renames: the previous index is whole there
                logging.getLogger(__name__).warning("%s is missing; loading the previous index from %s, left "
                                                    "by an interrupted save.", path, old)
                path = old
            else:
                raise FileNotFoundError(f"No index at {str(path)!r}: manifest.json is missing.")
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{str(path)!r}: manifest.json is not valid JSON ({exc}).") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
            raise ValueError(f"{str(path)!r} is not a utils_cv index (format "
                             f"{manifest.get('format') if isinstance(manifest, dict) else None!r}).")
        problems = []
        if manifest.get("backend") not in BACKENDS:
            problems.append(f"backend {manifest.get('backend')!r} is not one of {list(BACKENDS)}")
        if manifest.get("distance") not in DISTANCES:
            problems.append(f"distance {manifest.get('distance')!r} is not one of {list(DISTANCES)}")
        if isinstance(manifest.get("dim"), bool) or not isinstance(manifest.get("dim"), int) or manifest["dim"] < 1:
            problems.append(f"dim {manifest.get('dim')!r} is not a positive integer")
        if not isinstance(manifest.get("params"), dict) or not isinstance(manifest.get("metadata", {}), dict):
            problems.append("params / metadata are not objects")
        if not isinstance(manifest.get("sha256"), dict) or not set(manifest["sha256"]) <= {
                "ids.json", "features.npy", "index.faiss"} or "ids.json" not in manifest["sha256"]:
            problems.append("the sha256 table does not list the index files")
        if problems:
            raise ValueError(f"{str(path / 'manifest.json')!r} is not a valid index manifest: {'; '.join(problems)}.")
        manifest.setdefault("metadata", {})
        for name, digest in manifest["sha256"].items():
            f = path / name
            if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != digest:
                raise ValueError(f"{str(f)!r} is missing or corrupted (checksum mismatch); rebuild or restore the index.")
        if backbone is not None and manifest["metadata"].get("backbone") not in (None, backbone):
            raise ValueError(f"This index holds features of backbone {manifest['metadata']['backbone']!r}, "
                             f"not {backbone!r}: queries from another model are not comparable.")
        index = cls(manifest["backend"], manifest["distance"], int(manifest["dim"]), manifest["params"],
                    manifest["metadata"])
        try:
            stored = json.loads((path / "ids.json").read_text())
            index._ids = [_decode_id(i) for i in stored["ids"]]
            index._removed = {int(r) for r in stored["removed"]}
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{str(path / 'ids.json')!r} is not a valid id list ({exc}).") from exc
        index._row_of = {i: r for r, i in enumerate(index._ids) if r not in index._removed}
        if index.backend == "exact":
            try:  # allow_pickle=False: a pickled object array is refused, never executed
                feats = np.load(path / "features.npy", allow_pickle=False)
            except ValueError as exc:
                raise ValueError(f"{str(path / 'features.npy')!r} is not a plain float array ({exc}).") from exc
            if feats.dtype != np.float32 or feats.shape != (len(index._ids), index.dim):
                raise ValueError(f"{str(path / 'features.npy')!r} holds {feats.dtype} {feats.shape}; the manifest "
                                 f"announces float32 ({len(index._ids)}, {index.dim}).")
            index._features = feats
        else:
            faiss = _faiss()
            if faiss is None:
                raise ImportError("This index needs faiss to load: pip install faiss-cpu.")
            try:
                index._faiss = faiss.read_index(str(path / "index.faiss"))
            except RuntimeError as exc:
                raise ValueError(f"{str(path / 'index.faiss')!r} is not a readable faiss index ({exc}).") from exc
            if index._faiss.d != index.dim or index._faiss.ntotal != len(index._ids):
                raise ValueError(f"{str(path / 'index.faiss')!r} holds {index._faiss.ntotal} vectors of dimension "
                                 f"{index._faiss.d}; the manifest announces {len(index._ids)} of {index.dim}.")
            index._apply_search_params()
        return index


# ---------------------------------------------------------------------------- measuring
def clustered_vectors(n: int, d: int = 512, clusters: int = 1000, noise: float = 0.5, seed: int = 0,
                      draw: int = 0) -> np.ndarray:
    """Synthetic (n, d) float32 features: Gaussian blobs of std ``noise`` around ``clusters``
    random centres (standard normal).

    A stand-in for a large image collection when measuring index speed and recall (real
    embeddings form clusters too). The centres depend on ``seed`` alone; ``draw`` picks an
    independent sample around the same centres, e.g. ``draw=1`` for queries of a
    ``draw=0`` collection. Generated in blocks of 100k rows: memory is the output alone.
    """
    for name, value in (("n", n), ("d", d), ("clusters", clusters)):
        _positive_int(value, name)
    c = np.random.default_rng(seed).normal(size=(clusters, d)).astype(np.float32)
    rng = np.random.default_rng([seed, draw])
    x = np.empty((n, d), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x[start:start + m] = c[rng.integers(0, clusters, m)] + noise * rng.normal(size=(m, d)).astype(np.float32)
    return x


def sweep_search_params(index: "SimilarityIndex", query, settings: list[dict], k: int = 10,
                        truth: np.ndarray | None = None, exact: "SimilarityIndex | None" = None) -> list[dict]:
    """Queries per second and recall@k of ``index`` for each query-time setting.

    Args:
        settings: e.g. ``[{"efSearch": 16}, {"efSearch": 64}]`` for hnsw or
            ``[{"nprobe": 4}, {"nprobe": 16}]`` for ivfpq (see
            :meth:`SimilarityIndex.set_search_params`); ``{}`` keeps the current one.
        truth: the exact answers (nq, k) as ids; computed with ``exact`` when not given.

    Returns:
        One dict per setting: ``backend``, ``params`` (all of them), ``qps``, ``recall@k``.
        The index keeps the last setting.
    """
    import time

    q = _as_matrix(query, "query")
    if truth is None:
        if exact is None:
            raise ValueError("Give either 'truth' (exact answers) or 'exact' (an exact index over the same items).")
        truth = exact.search(q, k)[1]
    rows = []
    for setting in settings:
        index.set_search_params(**setting)
        start = time.perf_counter()
        _, got = index.search(q, k)
        seconds = max(time.perf_counter() - start, 1e-9)
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got.tolist(), np.asarray(truth).tolist())]))
        rows.append({"backend": index.backend, "params": dict(index.params), "qps": len(q) / seconds,
                     f"recall@{k}": recall})
    return rows
