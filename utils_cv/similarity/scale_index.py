"""Indexes built from embedding shards without holding every vector in memory.

The shards are the parquet files that :func:`utils_cv.similarity.scale.embed` writes (columns
``path``, ``embedding`` (float32 list), ``model``, ``error``); any parquet files with ``path``
and ``embedding`` columns do. Nothing here needs Ray: it reads the shards one at a time.

:func:`build_index` trains an approximate index (IVF-SQ8, IVF-PQ) on a seeded sample and adds
the vectors shard by shard, so that peak memory is the sample, then one shard plus the index.
Its result is an ordinary :class:`~utils_cv.similarity.index.SimilarityIndex` (saved and
loaded as any other, ids = the shards' paths). It goes through the index's public
``build`` + ``add``: ``build`` on the training sample gives the trained index with the sample's
rows in it, and every later shard adds its other rows.

Why the default sample is what it is: with ``sample=None`` and ``seed=0`` the rows drawn are the
very rows an in-memory ``SimilarityIndex.build`` of all vectors trains on (``64 * nlist`` rows
drawn with ``numpy.random.default_rng(0)``, in row order, ``nlist`` from the total count), so
the shard-built index equals the in-memory one (same quantizer, same codes); only the order
in which rows were added differs, which changes nothing but the order of exactly tied answers.

:class:`ShardedIndex` searches several saved indexes together (e.g. one per machine or per
month of photos) and merges their answers by distance, as faiss' ``IndexShards`` does.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from utils_cv.similarity.index import SimilarityIndex
from utils_cv.similarity.index_backends import BACKENDS, FAISS_BACKENDS, resolve_params
from utils_cv.similarity.scale_io import filesystem, iter_shards, list_shards, read_columns

logger = logging.getLogger(__name__)

__all__ = ["ShardedIndex", "build_index"]


def _count(shards: list[str]) -> tuple[list[np.ndarray], int]:
    """Per shard, the row numbers of its embedded rows (only the error column is read), and d."""
    import pyarrow as pa

    import pyarrow.parquet as pq

    valid = [np.nonzero([e is None or e == "" for e in read_columns(s, ["error"])[1]])[0] for s in shards]
    fs, inner = filesystem(shards[0])
    kind = pq.read_schema(inner, filesystem=fs).field("embedding").type
    if pa.types.is_fixed_size_list(kind):
        return valid, int(kind.list_size)
    first = next((s for s, v in zip(shards, valid) if len(v)), shards[0])
    return valid, next(x.shape[1] for _, x, _ in iter_shards([first]))


def build_index(shards, out=None, backend: str = "ivfsq", sample: int | None = None, seed: int = 0,
                distance: str = "l2", metadata: dict | None = None, progress: bool = True,
                **params) -> SimilarityIndex:
    """Build a :class:`SimilarityIndex` from embedding shards, one shard in memory at a time.

    Args:
        shards: a folder written by ``scale.embed`` (local or a URI), or a list of parquet files.
        out: when given, the index is saved there (``SimilarityIndex.load(out)`` opens it).
        backend: ``"ivfsq"`` or ``"ivfpq"`` (trained on the sample); ``"hnsw"`` and ``"exact"``
            also work (no training: the sample just goes in first), but hold every vector in memory.
        sample: training rows; None: ``64 * nlist`` (what the in-memory build trains on), at
            least ``max(nlist, 256)``.
        seed: draws the training sample (``numpy.random.default_rng(seed)``).
        progress: show a progress bar over the shards.
        **params: backend parameters as for ``SimilarityIndex.build``; ``nlist`` defaults to
            about ``4 * sqrt(n)`` of the total count n.

    Returns:
        the index, ids = the shards' ``path`` values; rows whose ``error`` is set are left out.
    """
    if backend not in BACKENDS:
        raise ValueError(f"The 'backend' parameter must be one of {list(BACKENDS)}. Got {backend!r} instead.")
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or sample < 1):
        raise ValueError(f"The 'sample' parameter must be an integer >= 1 or None. Got {sample!r} instead.")
    files = list_shards(shards)
    valid, dim = _count(files)
    n = int(sum(len(v) for v in valid))
    if n == 0:
        raise ValueError(f"The shards of {str(shards)!r} hold no embedded row (every row has an error).")
    merged = resolve_params(backend, params, n, dim)
    spec = FAISS_BACKENDS.get(backend)
    if spec is not None and spec.trained:
        size = sample or 64 * int(merged["nlist"])
        size = min(n, max(size, int(merged["nlist"]), 256))
    else:
        size = min(n, sample or len(valid[0]) or n)
    chosen = np.sort(np.random.default_rng(seed).choice(n, size, replace=False)) if size < n else np.arange(n)
    logger.info("building a %s index of %d vectors from %d shards; training sample of %d", backend, n, len(files),
                size)
    # pass 1: the sample rows, gathered shard by shard
    starts = np.cumsum([0] + [len(v) for v in valid])
    sample_x, sample_ids = [], []
    for s, (shard_paths, x, _) in enumerate(iter_shards(files)):
        local = chosen[(chosen >= starts[s]) & (chosen < starts[s + 1])] - starts[s]
        if len(local):
            sample_x.append(x[local])
            sample_ids += [shard_paths[i] for i in local]
        del x
    index = SimilarityIndex.build(np.concatenate(sample_x), sample_ids, backend=backend, distance=distance,
                                  metadata=metadata, **merged)
    del sample_x
    # pass 2: every other row, one shard at a time
    from tqdm.auto import tqdm

    for s, (shard_paths, x, _) in enumerate(tqdm(iter_shards(files), total=len(files), desc="index", unit="shard",
                                                 disable=not progress)):
        rest = np.ones(len(x), bool)
        rest[chosen[(chosen >= starts[s]) & (chosen < starts[s + 1])] - starts[s]] = False
        if rest.any():
            index.add(x[rest], [p for p, r in zip(shard_paths, rest) if r])
    if out is not None:
        index.save(out)
    return index


class ShardedIndex:
    """Several indexes searched as one: each answers the query, the answers are merged by
    distance (ties: the earlier index first). Ids must not repeat across the indexes.

    Args:
        indexes: :class:`SimilarityIndex` objects or folders saved by ``SimilarityIndex.save``;
            all of the same dimension and distance.
    """

    def __init__(self, indexes: Sequence):
        opened = [i if isinstance(i, SimilarityIndex) else SimilarityIndex.load(i) for i in indexes]
        if not opened:
            raise ValueError("The 'indexes' parameter is empty: give at least one index.")
        kinds = {(i.input_dim, i.dim, i.distance) for i in opened}
        if len(kinds) > 1:
            raise ValueError(f"The indexes differ in (input dimension, dimension, distance): {sorted(kinds)}; they "
                             "cannot be merged.")
        first = opened[0].whitening
        if any((i.whitening is None) != (first is None) or (first is not None and not (
                np.array_equal(i.whitening.mean, first.mean) and np.array_equal(i.whitening.projection,
                                                                                first.projection)))
               for i in opened):
            raise ValueError("The indexes apply different whitenings: their distances are not comparable.")
        self.indexes = opened
        self.dim, self.distance = opened[0].input_dim, opened[0].distance

    def __len__(self) -> int:
        return sum(len(i) for i in self.indexes)

    def search(self, query, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(D (nq, k) float32 ascending, ids (nq, k) object)``, as ``SimilarityIndex.search``."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(self):
            raise ValueError(f"The 'k' parameter must be an integer in [1, {len(self)}]. Got {k!r} instead.")
        parts = [i.search(query, min(k, len(i))) for i in self.indexes if len(i)]
        D = np.concatenate([p[0] for p in parts], axis=1)
        ids = np.concatenate([p[1] for p in parts], axis=1)
        order = np.argsort(D, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(D, order, 1), np.take_along_axis(ids, order, 1)
