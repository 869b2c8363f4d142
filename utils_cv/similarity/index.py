"""``SimilarityIndex``: features with ids, searched exactly or approximately, saved to disk.

Smaller distance means closer; ties break by the lower index. The index holds the ids, the
removals and the persistence; the search itself is a backend of :mod:`index_backends`
(``exact``, or a ``faiss.index_factory`` entry of ``FAISS_BACKENDS``: a new backend is one
table entry there). The on-disk format, the locking of concurrent saves and loads and the
checks of every file read back live in :mod:`index_storage`; choosing a backend and sweeping
search parameters in :mod:`index_tuning`, which builds on this module (never the reverse).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from utils_cv.similarity import index_backends as backends
from utils_cv.similarity import index_storage as storage
from utils_cv.common.paths import sha256sum
from utils_cv.similarity._checks import DISTANCES, as_matrix, check_distance, positive_int
from utils_cv.similarity.distances import faiss_module, knn, l2_normalize, pairwise_distances  # noqa: F401
from utils_cv.similarity.index_backends import BACKENDS, FAISS_BACKENDS, FaissBackend  # noqa: F401

__all__ = ["BACKENDS", "DISTANCES", "FAISS_BACKENDS", "FaissBackend", "SimilarityIndex", "knn", "pairwise_distances"]

log = logging.getLogger(__name__)


class SimilarityIndex:
    """Nearest-neighbour search over features with ids, exact or approximate, saved to disk.

    Build with :meth:`build`; ``search`` returns distances (smaller is closer) and the ids
    given at build / :meth:`add` time. Removed ids never come back: they are filtered out of
    every answer (the approximate indexes keep their vectors, skipped at search time).
    """

    def __init__(self, backend: str, distance: str, dim: int, params: dict, metadata: dict | None = None):
        self.backend, self.distance, self.dim = backend, distance, dim
        self.params = params
        self.metadata = dict(metadata or {})
        self._ids: list = []
        self._row_of: dict = {}
        self._removed: set[int] = set()
        self._exact = backends.ExactRows(np.empty((0, dim), np.float32)) if backend == "exact" else None
        self._faiss = None
        self.whitening = None  # a whitening.PCAWhitening applied to every row added and every query

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, features, ids, backend: str = "exact", distance: str = "l2", metadata: dict | None = None,
              whitening=None, **params) -> "SimilarityIndex":
        """Index ``features`` (n, d) under ``ids`` (n hashable ids, e.g. file paths).

        Args:
            backend: ``"exact"`` (brute force, the answers of :func:`knn`) or a key of
                :data:`FAISS_BACKENDS`: ``"hnsw"``, ``"ivfsq"``, ``"ivfpq"`` (``pip install faiss-cpu``).
            distance: ``"l2"`` or ``"cosine"``.
            metadata: what made the features (backbone, preprocessing...), saved with the index.
            whitening: a fitted ``whitening.PCAWhitening`` (e.g. ``PCAWhitening.fit(features)``):
                applied to these rows, to every row added later and to every query, and saved
                with the index. Callers keep passing the backbone's features.
            **params: backend parameters; defaults in :data:`FAISS_BACKENDS` (hnsw: M=32,
                efConstruction=200, efSearch=128; ivfsq: nlist=4*sqrt(n), nprobe=8,
                refine=False; ivfpq: nlist=4*sqrt(n), nprobe=8, m=d/4, refine=True, k_factor=32).
        """
        if backend not in BACKENDS:
            raise ValueError(f"The 'backend' parameter must be one of {set(BACKENDS)}. Got {backend!r} instead.")
        check_distance(distance)
        x = cls._checked_rows(features)
        if whitening is not None:
            if not callable(whitening) or not hasattr(whitening, "to_arrays"):
                raise TypeError("The 'whitening' parameter must be a whitening.PCAWhitening (or None).")
            if x.shape[1] != whitening.input_dim:
                raise ValueError(f"'features' has dimension {x.shape[1]}; the whitening was fitted on "
                                 f"{whitening.input_dim}.")
        stored = x if whitening is None else whitening(x)
        merged = backends.resolve_params(backend, params, *stored.shape)
        index = cls(backend, distance, stored.shape[1], merged, metadata)
        index.whitening = whitening
        if backend != "exact":
            index._faiss = backends.build_faiss(backend, merged, stored.shape[1], index._prepared(stored))
        index._add_rows(stored, ids)
        return index

    @property
    def input_dim(self) -> int:
        """The dimension of the features that ``add`` and ``search`` take (``dim`` is that of the
        stored vectors; they differ when a whitening reduces the dimension)."""
        return self.dim if self.whitening is None else self.whitening.input_dim

    def _stored(self, x: np.ndarray, name: str) -> np.ndarray:
        """Rows given by a caller, checked, in the space the index stores (whitened)."""
        if x.shape[1] != self.input_dim:
            hint = "" if name == "features" else f" (features of {self.metadata.get('backbone', 'another model')!r}?)"
            raise ValueError(f"{name!r} has dimension {x.shape[1]} but the index takes dimension {self.input_dim}"
                             f"{hint}.")
        return x if self.whitening is None else self.whitening(x)

    @staticmethod
    def _checked_rows(features) -> np.ndarray:
        x = as_matrix(features, "features")
        if x.shape[1] == 0:
            raise ValueError("The 'features' parameter has 0 columns: give (n, d) features with d >= 1.")
        return x

    def _prepared(self, x: np.ndarray) -> np.ndarray:
        return l2_normalize(x) if self.distance == "cosine" else x

    def set_search_params(self, **params) -> None:
        """Change query-time parameters without rebuilding: ``efSearch`` (hnsw), ``nprobe``
        and ``k_factor`` (ivfsq, ivfpq; ``k_factor`` only with ``refine=True``). Higher values find
        more of the true neighbours and answer more slowly; ``index_tuning.sweep_search_params``
        measures both."""
        allowed = FAISS_BACKENDS[self.backend].search if self.backend in FAISS_BACKENDS else ()
        unknown = set(params) - set(allowed)
        if unknown:
            raise ValueError(f"Unknown search parameters {sorted(unknown)} for backend {self.backend!r}; "
                             f"it takes {list(allowed) or 'none'}.")
        for name, value in params.items():
            if backends.param_problem(name, value):
                raise ValueError(f"The {name!r} parameter {backends.param_problem(name, value)}. Got {value!r} instead.")
        if "k_factor" in params and not self.params.get("refine"):
            raise ValueError("'k_factor' applies only to an ivfsq or ivfpq index built with refine=True.")
        self.params.update(params)
        backends.set_faiss_params(self._faiss, self.params, allowed)

    # ------------------------------------------------------------------ contents
    def __len__(self) -> int:
        return len(self._ids) - len(self._removed)

    @property
    def _features(self) -> np.ndarray:
        """The exact backend's (n, d) vectors: a view of the growing buffer, no copy."""
        return self._exact.rows

    def add(self, features, ids) -> None:
        """Add rows; ``ids`` must be new (an id removed earlier may be added again). The exact
        backend grows its buffer by doubling, so repeated adds copy each row O(1) times."""
        x = self._checked_rows(features)
        ids = list(ids)
        if len(ids) != len(x):
            raise ValueError(f"'ids' has {len(ids)} items but 'features' has {len(x)} rows: they must be aligned.")
        self._add_rows(self._stored(x, "features"), ids)

    def _add_rows(self, x: np.ndarray, ids: list) -> None:
        ids = list(ids)
        if len(ids) != len(x):
            raise ValueError(f"'ids' has {len(ids)} items but 'features' has {len(x)} rows: they must be aligned.")
        if len(set(ids)) != len(ids):
            raise ValueError("'ids' contains duplicates: each id names one item.")
        clash = [i for i in ids if i in self._row_of]
        if clash:
            raise ValueError(f"ids already in the index: {clash[:3]}; remove them first.")
        start = len(self._ids)
        if self.backend == "exact":
            self._exact.append(x)
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
        """Remove items by id; returns how many were removed. Unknown or repeated ids raise
        before anything is removed (KeyError, ValueError)."""
        ids = list(ids)
        missing = [i for i in ids if i not in self._row_of]
        if missing:
            raise KeyError(f"ids not in the index: {missing[:3]}")
        if len(set(ids)) != len(ids):
            raise ValueError("The 'ids' parameter names an id twice; nothing was removed.")
        for i in ids:
            self._removed.add(self._row_of.pop(i))
        return len(ids)

    # ------------------------------------------------------------------ search
    def search(self, query, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest items of each query row.

        Returns:
            ``(D, ids)``: (nq, k) float32 distances, ascending, and an (nq, k) object array of
            the ids given at build time. Always k answers per row (see the module docstring).
        """
        q = as_matrix(query, "query")
        if len(q) == 0:
            raise ValueError("The 'query' parameter is empty: give at least one row.")
        q = self._stored(q, "query")
        positive_int(k, "k")
        if k > len(self):
            raise ValueError(f"The 'k' parameter ({k}) is larger than the {len(self)} items in the index.")
        fetch = min(len(self._ids), k + len(self._removed))
        if self.backend == "exact":
            D, I = self._exact.search(q, fetch, self.distance)
        else:
            D, I = backends.faiss_search(self._faiss, self.backend, self.params, self._prepared(q), fetch, k,
                                         self._removed)
            D = np.sqrt(np.maximum(D, 0.0)) if self.distance == "l2" else np.maximum(D, 0.0) / 2.0
        if not self._removed:
            return np.ascontiguousarray(D[:, :k], dtype=np.float32), self._id_array()[I[:, :k]]
        out_d = np.full((len(q), k), np.inf, dtype=np.float32)
        out_i = np.empty((len(q), k), dtype=object)
        for r in range(len(q)):
            keep = [(d, i) for d, i in zip(D[r], I[r]) if i >= 0 and int(i) not in self._removed][:k]
            for c, (d, i) in enumerate(keep):
                out_d[r, c], out_i[r, c] = d, self._ids[int(i)]
        return out_d, out_i

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> Path:
        """Write the index to the folder ``path``: ``manifest.json`` (backend, parameters,
        dimension, distance, metadata, versions, sha256 of each file), ``ids.json`` and the
        vectors (``features.npy`` or ``index.faiss``).

        Only an index folder (or an empty one) is ever replaced: a regular file or another
        folder at ``path`` raises FileExistsError before anything changes. The folder is
        written beside the target and swapped in under a lock, so concurrent loads see the
        old or the new index whole and concurrent saves apply one after the other
        (:mod:`index_storage`)."""
        import shutil

        from utils_cv.common.versions import library_versions

        path = Path(path)
        if storage.lock_path(path).exists():  # saved here before: checked between another save's swaps
            with storage.locked(path, shared=True):
                storage.check_save_target(path)
        else:  # nothing is written beside a target that is refused
            storage.check_save_target(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = storage.new_folder(path.parent, path.name)
        try:
            ids = {"ids": [storage.encode_id(i) for i in self._ids], "removed": sorted(self._removed)}
            (tmp / "ids.json").write_text(json.dumps(ids))
            if self.backend == "exact":
                data_file = "features.npy"
                np.save(tmp / data_file, self._features)
            else:
                data_file = "index.faiss"
                faiss_module().write_index(self._faiss, str(tmp / data_file))
            names = ["ids.json", data_file]
            if self.whitening is not None:
                np.savez(tmp / storage.WHITENING_FILE, **self.whitening.to_arrays())
                names.append(storage.WHITENING_FILE)
            files = {name: sha256sum(tmp / name) for name in names}
            manifest = {"format": storage.FORMAT, "backend": self.backend, "distance": self.distance,
                        "dim": self.dim, "params": self.params, "metadata": self.metadata, "count": len(self),
                        "versions": library_versions("numpy", "faiss"), "sha256": files}
            if self.whitening is not None:
                manifest["whitening"] = {"input_dim": self.whitening.input_dim, "dim": self.whitening.dim}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
            with storage.locked(path, shared=False):
                storage.check_save_target(path)  # again: it may have changed while the files were written
                storage.swap_in(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path, backbone: str | None = None) -> "SimilarityIndex":
        """Read an index written by :meth:`save`, checking every file's checksum, every
        manifest field and every array before use (ValueError naming the file and field).

        Args:
            backbone: when given, refuse an index whose features came from another backbone.
        """
        path = Path(path)
        with storage.locked(path, shared=True):
            if not (path / "manifest.json").is_file():
                old = path.with_name(f".{path.name}.old")
                if not path.exists() and (old / "manifest.json").is_file():
                    # a save was killed between its two renames: the previous index is whole there
                    log.warning("%s is missing; loading the previous index from %s, left by an interrupted save.",
                                path, old)
                    path = old
                else:
                    raise FileNotFoundError(f"No index at {str(path)!r}: manifest.json is missing.")
            return cls._read(path, backbone)

    @classmethod
    def _read(cls, path: Path, backbone: str | None) -> "SimilarityIndex":
        where = path / "manifest.json"
        manifest = storage.read_json(where)
        if not isinstance(manifest, dict) or manifest.get("format") != storage.FORMAT:
            raise ValueError(f"{str(path)!r} is not a utils_cv index (format "
                             f"{manifest.get('format') if isinstance(manifest, dict) else None!r}).")
        manifest.setdefault("metadata", {})
        cls._check_manifest(manifest, where)
        for name, digest in manifest["sha256"].items():
            f = path / name
            if not f.is_file() or sha256sum(f) != digest:
                raise ValueError(f"{str(f)!r} is missing or corrupted (checksum mismatch); rebuild or restore the index.")
        if backbone is not None and manifest["metadata"].get("backbone") not in (None, backbone):
            raise ValueError(f"This index holds features of backbone {manifest['metadata']['backbone']!r}, "
                             f"not {backbone!r}: queries from another model are not comparable.")
        index = cls(manifest["backend"], manifest["distance"], manifest["dim"], manifest["params"],
                    manifest["metadata"])
        index._ids, index._removed = storage.read_ids(path / "ids.json")
        if manifest["count"] != len(index):
            raise ValueError(f"{str(where)!r}: field 'count' is {manifest['count']}, but ids.json holds {len(index)}.")
        index._row_of = {i: r for r, i in enumerate(index._ids) if r not in index._removed}
        if "whitening" in manifest:
            index.whitening = storage.read_whitening(path / storage.WHITENING_FILE, manifest["whitening"], index.dim)
        if index.backend == "exact":
            index._exact = backends.ExactRows(storage.read_matrix(path / "features.npy", len(index._ids), index.dim))
            return index
        faiss, f = faiss_module(), path / "index.faiss"
        if faiss is None:
            raise ImportError("This index needs faiss to load: pip install faiss-cpu.")
        try:
            index._faiss = faiss.read_index(str(f))
        except RuntimeError as exc:
            raise ValueError(f"{str(f)!r} is not a readable faiss index ({exc}).") from exc
        if index._faiss.d != index.dim or index._faiss.ntotal != len(index._ids):
            raise ValueError(f"{str(f)!r} holds {index._faiss.ntotal} vectors of dimension {index._faiss.d}; "
                             f"the manifest announces {len(index._ids)} of {index.dim}.")
        try:
            backends.set_faiss_params(index._faiss, index.params, FAISS_BACKENDS[index.backend].search)
        except RuntimeError as exc:
            raise ValueError(f"{str(f)!r} is not a {index.backend} index ({exc}).") from exc
        return index

    @staticmethod
    def _check_manifest(manifest: dict, where: Path) -> None:
        """Every field of a manifest, named in the error with the file."""
        problems = [f"field {key!r} is missing" for key in
                    ("backend", "distance", "dim", "params", "count", "sha256") if key not in manifest]
        if problems:
            raise ValueError(f"{str(where)!r} is not a valid index manifest: {'; '.join(problems)}.")
        backend, params, dim, count = manifest["backend"], manifest["params"], manifest["dim"], manifest["count"]
        if backend not in BACKENDS:
            problems.append(f"backend {backend!r} is not one of {list(BACKENDS)}")
        if manifest["distance"] not in DISTANCES:
            problems.append(f"distance {manifest['distance']!r} is not one of {list(DISTANCES)}")
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= backends.MAX_INT_PARAM:
            problems.append(f"dim {dim!r} is not a positive integer")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            problems.append(f"count {count!r} is not a non-negative integer")
        if not isinstance(params, dict) or not isinstance(manifest["metadata"], dict):
            problems.append("params / metadata are not objects")
        elif backend in BACKENDS:
            expected = set(backends.defaults(backend))
            if set(params) != expected:
                problems.append(f"params has keys {sorted(params)}; backend {backend!r} takes {sorted(expected)}")
            problems += [f"params.{n} {backends.param_problem(n, v)}, got {v!r}" for n, v in params.items()
                         if n in expected and backends.param_problem(n, v)]
        data_file = "features.npy" if backend == "exact" else "index.faiss"
        table = manifest["sha256"]
        listed = {"ids.json", data_file} | ({storage.WHITENING_FILE} if "whitening" in manifest else set())
        if not isinstance(table, dict) or set(table) != listed or not all(
                isinstance(v, str) and len(v) == 64 for v in table.values()):
            problems.append(f"the sha256 table does not list the index files ({', '.join(sorted(listed))})")
        if problems:
            raise ValueError(f"{str(where)!r} is not a valid index manifest: {'; '.join(problems)}.")
