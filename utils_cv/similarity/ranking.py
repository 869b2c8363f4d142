"""Where each query's relevant items land in its full ranking, without sorting whole rows.

The ranking kernel behind :mod:`utils_cv.similarity.metrics`, in its own module because it is
one concern (a blocked computation with its own memory plan) and metrics.py would pass the
400-line limit with it. Not meant to be called directly: use ``metrics.relevant_ranks``.

The idea: the rank of a query's i-th relevant item (0-based, relevant items sorted by
(distance, index)) is ``i + 1 + (number of non-relevant items ranked before it)``, and a
non-relevant item can precede a relevant one only if it is no farther than the query's
farthest relevant item. So:

1. Rows are put in class order. One small product per class gives each query its distances
   to its relevant items; sorted, they are the query's *ladder*; the last rung (or the first,
   when only the first relevant rank is wanted) is the query's threshold.
2. The large product runs in square tiles. In leave-one-out only the tiles on and above the
   diagonal are computed: a tile serves its rows and, read by columns, its columns (half the
   multiply-adds). In a tile, only entries at or under their row's threshold are looked at
   (about 2% of them at 100,000 x 128 in 1,000 classes); each non-relevant one is placed on
   its row's ladder and counted on that rung. The placing is one ``searchsorted`` for all
   candidates of a tile: rungs (stored so) and candidates are int64 keys ordered as (row,
   distance) (:func:`_keys`). Exact ties with a relevant item go by index. When only ranks within R
   matter (R-precision, MAP@R), a row's threshold falls once R items are known to be closer
   (checked after a block of rows has gained about 8 counts per row: checking costs a pass
   over their ladders).
3. A running sum of the counts along each ladder gives the non-relevant items before each
   relevant one.

Distances are one matrix product of augmented rows, ``[x, |x|^2, 1] . [-2y, 1, |y|^2]`` for
squared L2 (the same order as L2) and ``x . -y`` on unit rows for cosine, so the small and the
large products, and every tile, compute a distance the same way and no pass over a tile is
spent turning products into distances. Values agree with ``|x - y|^2`` to float32 rounding.
The product, the one comparison of every entry with its row's threshold and the placing run
on torch; the rest of a tile's work, on its few candidates, on numpy. Tiles are shared out
among a thread per core (at most ``_MAX_WORKERS``, :mod:`sweep`), each running torch on its
share of the cores, so that numpy's work on one tile runs beside another tile's; they add to
the counts under a lock. When only
the first relevant item is wanted, tiles are found in a bfloat16 product and only the rows or
columns holding a candidate are multiplied in float32 (:mod:`prefilter`: same results).
Memory: a tile and its mask per worker (20 MB; and an 8 MB bfloat16 one for the prefilter),
and per relevant (query, item)
pair a (row, distance) key and a count (12 bytes; the ranks that come out take 8); operands are
made a tile at a time from the caller's rows. When
the pairs would pass ``_STATE_BYTES`` the queries are taken in chunks, each against the whole
reference (then without the symmetric saving).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from utils_cv.similarity import prefilter, sweep

__all__ = ["RankedRelevant", "rank_relevant"]

_TILE = 2048  # rows and columns of a tile (16 MB): large enough for the product to keep both
# cores busy on a loaded machine, small enough to keep memory under the previous version's
_STATE_BYTES = 256 * 1024 * 1024  # per-(query, relevant item) state held at once
_PHASE1_BYTES = 64 * 1024 * 1024  # one class's (rows x relevant items) block of distances
_MIN_ROWS = 16
_PREFILTER: bool | None = None  # None: wherever prefilter.usable() (tests force it either way)
_WORKERS: int | None = None  # threads that take tiles; None: torch's thread count, at most _MAX_WORKERS
_MAX_WORKERS = 4


@dataclass
class RankedRelevant:
    """Ranks in CSR form, rows in class order: ``ranks[offsets[j]:offsets[j + 1]]`` are the
    1-based ranks (ascending) of the relevant items of query ``query[j]`` (only the first with
    ``depth="first"``; with ``depth="within"`` ranks above ``num_relevant[j]`` are lower bounds),
    which has ``num_relevant[j]`` relevant items in all. Queries with none are left out."""

    query: np.ndarray
    offsets: np.ndarray
    ranks: np.ndarray
    num_relevant: np.ndarray


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b.T`` through one kind of kernel: MKL multiplies operands of fewer than 16 rows
    with other kernels whose rounding differs, and then one pair of equal vectors could get two
    distances (a false order instead of a tie). Zero rows pad both operands up to 16."""
    pa, pb = max(0, _MIN_ROWS - len(a)), max(0, _MIN_ROWS - len(b))
    if not pa and not pb:
        return torch.mm(a, b.T, out=out)
    prod = torch.mm(torch.cat([a, a.new_zeros(pa, a.shape[1])]), torch.cat([b, b.new_zeros(pb, b.shape[1])]).T)
    prod = prod[: len(a), : len(b)]
    return prod if out is None else out.copy_(prod)


class _Operands:
    """Rows of ``x`` in class order, made into product operands a block at a time (one tile's
    worth, so no reordered copy of the data is held): left ``[x, |x|^2, 1]`` and right
    ``[-2y, 1, |y|^2]`` for l2, ``x / |x|`` and ``-y / |y|`` for cosine. Norms are computed once
    for all rows, so a row's operand is the same whichever block it is taken in."""

    def __init__(self, x: np.ndarray, order: np.ndarray, distance: str):
        self.x, self.order, self.cosine = x, order, distance == "cosine"
        t = torch.from_numpy(x)
        if self.cosine:  # as torch.nn.functional.normalize
            self.norm = torch.linalg.vector_norm(t, dim=1).clamp_min(1e-12).numpy()
        else:
            self.norm = (t * t).sum(1).numpy()

    def __len__(self) -> int:
        return len(self.x)

    def _operand(self, positions, right: bool) -> torch.Tensor:
        idx = self.order[positions]
        rows, norm = self.x.take(idx, axis=0), self.norm[idx]
        if self.cosine:
            rows /= norm[:, None]
            return torch.from_numpy(np.negative(rows, out=rows) if right else rows)
        out = np.empty((len(rows), rows.shape[1] + 2), dtype=np.float32)
        np.multiply(rows, np.float32(-2.0 if right else 1.0), out=out[:, :-2])
        out[:, -2], out[:, -1] = (1.0, norm) if right else (norm, 1.0)
        return torch.from_numpy(out)

    def left(self, a: int, b: int | None = None) -> torch.Tensor:
        """Rows a..b of the class order (or the positions in the array ``a``) as left operands."""
        return self._operand(a if b is None else slice(a, b), right=False)

    def right(self, a: int, b: int) -> torch.Tensor:
        return self._operand(slice(a, b), right=True)


def _keys(rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """int64 keys ordered as (row, distance): the row in the high 32 bits, below it the float32
    distance's bits mapped to an unsigned order (negative distances, cosine's, included; -0.0
    counts as 0.0, since they are equal distances). One sorted array of keys lets one
    ``searchsorted`` place every candidate of a tile on its own row's rungs."""
    bits = (values + np.float32(0.0)).view(np.int32).astype(np.int64)
    order = np.where(bits >= 0, bits, -(bits & 0x7FFFFFFF)) + (1 << 31)
    return (rows.astype(np.int64, copy=False) << 32) | order


def _distances(keys: np.ndarray) -> np.ndarray:
    """The float32 distances of :func:`_keys` (the inverse of its lower 32 bits)."""
    m = (keys & 0xFFFFFFFF) - (1 << 31)
    return np.where(m >= 0, m, (-m) | 0x80000000).astype(np.uint32).view(np.float32)


class _Ladders:
    """Each chunk row's relevant distances, sorted (the rungs, one flat array with ``offsets``,
    held as :func:`_keys` of (chunk row, distance) so that candidates are placed without
    rebuilding them), and the non-relevant items counted on each."""

    def __init__(self, left: _Operands, right: _Operands, row_cls, col_cls, col_orig, rows: slice, loo: bool,
                 depth: str):
        self.left, self.right, self.col_orig, self.row0, self.loo = left, right, col_orig, rows.start, loo
        n_rows = rows.stop - rows.start
        cls = row_cls[rows]
        starts = np.searchsorted(col_cls, cls, side="left")
        sizes = np.searchsorted(col_cls, cls, side="right") - starts
        self.class_start, self.num_relevant = starts, sizes - (1 if loo else 0)
        lengths = np.minimum(self.num_relevant, 1) if depth == "first" else self.num_relevant
        self.tighten = depth == "within"
        self.shift = 1.0 if left.cosine else 0.0  # the prefilter's cosine values are 1 + distance
        self._gained: dict[int, int] = {}  # row block -> counts added since its thresholds were last lowered
        offsets = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        self.offsets = offsets
        total = int(offsets[-1])
        self.keys = np.empty(total, dtype=np.int64)
        self.counts = np.zeros(total, dtype=np.int32)
        # NaN passes no comparison: a row without relevant items never gets a candidate, not even
        # an entry at -inf (an l2 product can overflow there)
        self.threshold = np.full(n_rows, np.nan, dtype=np.float32)
        self.lock = threading.Lock()  # workers add to the counts (and lower thresholds) one at a time
        bounds = np.flatnonzero(np.diff(cls)) + 1  # rows of one class are consecutive
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, n_rows]):
            c0, m = int(starts[a]), int(sizes[a])
            if self.num_relevant[a] <= 0:
                continue
            right_op = right.right(c0, c0 + m)
            step = max(1, _PHASE1_BYTES // (8 * m))
            for s in range(a, b, step):
                e = min(b, s + step)
                d = _mm(left.left(rows.start + s, rows.start + e), right_op).numpy()
                if loo:  # the query itself is the reference item at its own position
                    keep = np.arange(m)[None, :] != np.arange(rows.start + s - c0, rows.start + e - c0)[:, None]
                    d = d[keep].reshape(e - s, m - 1)
                order = np.argsort(d, axis=1, kind="stable")[:, : lengths[a]]  # columns are in index order
                d = np.take_along_axis(d, order, 1)
                self.keys[offsets[s] : offsets[e]] = _keys(np.repeat(np.arange(s, e), lengths[a]), d.reshape(-1))
                self.threshold[s:e] = d[:, -1]

    def count(self, d: np.ndarray, r0: int, c0: int, row_cls, col_cls, by_columns: bool, mask: np.ndarray) -> None:
        """Count the non-relevant candidates of tile ``d``: its rows are chunk rows ``r0...``
        and its columns reference items ``c0...``, or the other way round with ``by_columns``
        (the transposed half of a symmetric tile). ``mask``: a worker's buffer of a tile's size."""
        n = d.shape[1] if by_columns else d.shape[0]
        t = self.threshold[r0 : r0 + n]
        mask = mask[: d.size].reshape(d.shape)
        # the one pass over every entry: torch's comparison (on the worker's threads) beats numpy's
        torch.le(torch.from_numpy(d), torch.from_numpy(t[None, :] if by_columns else t[:, None]),
                 out=torch.from_numpy(mask))
        flat, a, b = self.positions(mask)
        if len(flat):
            self.place(a, b, d.reshape(-1)[flat], r0, c0, d.shape, row_cls, col_cls, by_columns)

    @staticmethod
    def positions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat index, row and column in the tile of each set entry of ``mask`` (row-major order)."""
        flat = np.flatnonzero(mask)
        width = mask.shape[1]
        if width & (width - 1) == 0:  # a power of two (full tiles): a shift and a mask, not an integer division
            return flat, flat >> (width.bit_length() - 1), flat & (width - 1)
        return (flat, *np.divmod(flat, width))

    def place(self, a, b, v, r0: int, c0: int, shape, row_cls, col_cls, by_columns: bool) -> None:
        """Place candidates at tile positions (a, b) with float32 distances v on their rows' rungs."""
        n = shape[1] if by_columns else shape[0]
        r, c = (b + r0, a + c0) if by_columns else (a + r0, b + c0)
        # rows and columns are in class order: only a tile whose classes overlap holds relevant pairs
        if row_cls[r0] <= col_cls[c0 + (shape[0] if by_columns else shape[1]) - 1] and col_cls[c0] <= row_cls[r0 + n - 1]:
            other = row_cls[r] != col_cls[c]
            r, c, v = r[other], c[other], v[other]
            if len(r) == 0:
                return
        # each candidate placed on its own row's rungs: the first rung not below it. A candidate
        # is no farther than its row's threshold, which is one of the row's rungs, so it lands
        # on a rung of its own row (never past the last one) unless a tie moves it on
        lo, hi = self.offsets[r0], self.offsets[r0 + n]
        rungs = self.keys[lo:hi]
        k = _keys(r, v)
        perm = None
        if by_columns:  # candidates come in column order: in row order the search walks the rungs once
            small = np.int16 if n < 1 << 15 else np.int64  # 16-bit keys: numpy sorts them by radix
            perm = np.argsort((r - r0).astype(small), kind="stable")
            k = k[perm]
        pos = torch.searchsorted(torch.from_numpy(rungs), torch.from_numpy(k)).numpy()  # from lo
        tied = np.flatnonzero(rungs[np.minimum(pos, hi - lo - 1)] == k)
        if len(tied):  # equal distances: relevant items of lower index come first
            at = tied if perm is None else perm[tied]
            rt = r[at]
            pos[tied] += self._tied_before(rt, v[at], self.col_orig[c[at]])
            past = pos[tied] >= self.offsets[rt + 1] - lo  # after the row's last rung: precedes no relevant item
            if past.any():
                pos = np.delete(pos, tied[past])
        counted = np.bincount(pos, minlength=hi - lo)
        # another worker may be reading these rows' thresholds meanwhile: it sees each as it was or
        # as lowered, both rungs of the row at or above the final one, so either is a valid threshold
        with self.lock:
            np.add(self.counts[lo:hi], counted, out=self.counts[lo:hi], casting="unsafe")
            if self.tighten:  # lowered once the rows gained ~8 counts each: a pass over their ladders costs a tile
                gained = self._gained.get(r0, 0) + len(pos)
                self._gained[r0] = 0 if gained >= 8 * n else gained
                if gained >= 8 * n:
                    self._tighten(r0, n, lo, hi)

    def _tied_before(self, rows: np.ndarray, values: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """For each (row, value, index): relevant items of the row at exactly that distance with
        a lower reference index. Rare outside duplicates, so recomputed (one product per class,
        the same kernel as the ladders') rather than stored for every rung."""
        out = np.zeros(len(rows), dtype=np.int64)
        for c0 in np.unique(self.class_start[rows]):
            sel = np.flatnonzero(self.class_start[rows] == c0)
            uniq, at = np.unique(rows[sel], return_inverse=True)
            m = self.num_relevant[uniq[0]] + (1 if self.loo else 0)
            d = _mm(self.left.left(self.row0 + uniq), self.right.right(c0, c0 + m)).numpy()[at]
            members = np.arange(c0, c0 + m)
            same = (d == values[sel][:, None]) & (self.col_orig[members][None, :] < indices[sel][:, None])
            if self.loo:  # not the query itself
                same &= members[None, :] != (self.row0 + rows[sel])[:, None]
            out[sel] = same.sum(1)
        return out

    def _tighten(self, r0: int, n: int, lo: int, hi: int) -> None:
        """Lower the rows' thresholds to the first rung i with i + 1 + (non-relevant items
        counted before it) >= R: R items are already known to be that close, so nothing
        farther can rank within R; rungs after i are ranked after R whatever is counted later."""
        starts, lengths = self.offsets[r0 : r0 + n] - lo, np.diff(self.offsets[r0 : r0 + n + 1])
        if hi == lo:
            return
        before = self.counts[lo:hi].cumsum(dtype=np.int64)
        base = np.where(starts > 0, before[np.maximum(starts - 1, 0)], 0)
        ahead = np.arange(1, hi - lo + 1) - np.repeat(starts + base, lengths) + before  # i + 1 + counted
        short = ahead < np.repeat(self.num_relevant[r0 : r0 + n], lengths)
        has = lengths > 0
        first_enough = np.add.reduceat(short, starts[has])
        self.threshold[r0 : r0 + n][has] = _distances(self.keys[lo + starts[has] + first_enough])

    def ranks(self) -> np.ndarray:
        """Rank of rung i (0-based) of a row: i + 1 + non-relevant items counted on rungs 0..i."""
        del self.keys
        out = self.counts.cumsum(dtype=np.int64)
        del self.counts
        offsets = self.offsets
        starts, lengths = offsets[:-1], np.diff(offsets)
        if len(out) == 0:
            return out
        base = np.where(starts > 0, out[np.maximum(starts - 1, 0)], 0)  # counted on earlier rows
        step = 1 << 16  # rows at a time: small temporaries
        for a in range(0, len(starts), step):
            b = min(len(starts), a + step)
            lo, hi = offsets[a], offsets[b]
            out[lo:hi] += np.arange(lo + 1, hi + 1) - np.repeat(base[a:b] + starts[a:b], lengths[a:b])
        return out


def _chunks(per_row: np.ndarray) -> list[slice]:
    """Consecutive row ranges whose relevant pairs' state fits ``_STATE_BYTES``."""
    cum = np.cumsum(16 * per_row)
    out, start = [], 0
    while start < len(per_row):
        done = cum[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(cum, done + _STATE_BYTES, side="right")))
        out.append(slice(start, min(stop, len(per_row))))
        start = stop
    return out


def rank_relevant(q: np.ndarray, y_q: np.ndarray, r: np.ndarray | None, y_r: np.ndarray | None, distance: str,
                  depth: str = "all") -> RankedRelevant:
    """Ranks of each query's relevant items in its full ranking (``r=None``: leave-one-out).

    Args:
        q, r: C-contiguous float32 (n, d) rows, checked by the caller.
        y_q, y_r: labels, one per row, checked by the caller.
        distance: ``"l2"`` or ``"cosine"``.
        depth: ``"all"``: rank every relevant item (the full-ranking mAP needs them);
            ``"within"``: only those ranked within the first R (R-precision, MAP@R): rows'
            thresholds fall as non-relevant items are counted, so fewer entries are looked at;
            ``"first"``: only the first relevant item (recall@K, precision@1, MRR), the
            threshold being the nearest relevant item.
    """
    loo = r is None
    classes, inverse = np.unique(np.concatenate([y_q] if loo else [y_q, y_r]), return_inverse=True)
    cq = inverse[: len(q)].astype(np.int64)
    cr = cq if loo else inverse[len(q):].astype(np.int64)
    q_order = np.argsort(cq, kind="stable")
    r_order = q_order if loo else np.argsort(cr, kind="stable")
    row_cls, col_cls = cq[q_order], cr[r_order]
    left = _Operands(q, q_order, distance)
    right = left if loo else _Operands(r, r_order, distance)
    per_row = np.ones(len(q), np.int64) if depth == "first" else np.bincount(col_cls, minlength=len(classes))[row_cls]
    chunks = _chunks(per_row)
    symmetric = loo and len(chunks) == 1
    ranks, num_relevant, offsets = [], [], [np.zeros(1, dtype=np.int64)]
    n_ref = len(right)
    # the nearest relevant item alone leaves few candidates: found in a bfloat16 product where that
    # pays (prefilter). Not for "within": its thresholds fall only as counts arrive, and until
    # then most rows of a tile hold one (measured: slower)
    flt = None
    if depth == "first" and (prefilter.usable() if _PREFILTER is None else _PREFILTER):
        flt = prefilter.Filter(right.x, right.cosine, _TILE, len(left))
    with torch.inference_mode():
        for rows in chunks:
            lad = _Ladders(left, right, row_cls, col_cls, r_order, rows, loo, depth)
            chunk_cls = row_cls[rows]

            def work(tile: tuple[int, int], scratch: sweep.Scratch) -> None:
                i0, j0 = tile
                i1, j1 = min(rows.stop, i0 + _TILE), min(n_ref, j0 + _TILE)
                if scratch.key != j0:  # tiles come column block by column block
                    scratch.key, scratch.right, scratch.rb = j0, right.right(j0, j1), None
                left_op = left.left(i0, i1)
                reads = [(i0 - rows.start, j0, chunk_cls, False)]
                if symmetric and i0 != j0:  # the same tile read by columns: rows j, columns i
                    reads.append((j0, i0, row_cls, True))
                if flt is not None and flt.on and flt.count(lad, left_op, i0, reads, col_cls, _mm, scratch):
                    return
                d = scratch.tile[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)
                _mm(left_op, scratch.right, out=d)
                for r0, c0, cls, by_columns in reads:
                    lad.count(d.numpy(), r0, c0, cls, col_cls, by_columns, scratch.mask)

            tiles = [(i0, j0) for j0 in range(0, n_ref, _TILE)
                     for i0 in range(rows.start, min(n_ref, j0 + _TILE) if symmetric else rows.stop, _TILE)]
            workers = min(torch.get_num_threads(), _MAX_WORKERS) if _WORKERS is None else _WORKERS
            sweep.sweep(tiles, work, min(workers, len(tiles)), _TILE)
            num_relevant.append(lad.num_relevant)
            offsets.append(lad.offsets[1:] + offsets[-1][-1])
            ranks.append(lad.ranks())
            del lad
    num_relevant = np.concatenate(num_relevant)
    keep = num_relevant > 0
    offsets = np.concatenate(offsets)
    # rows with no relevant item have empty ladders: dropping them leaves the ranks as they are
    return RankedRelevant(query=q_order[keep].astype(np.int64), offsets=np.r_[0, offsets[1:][keep]],
                          ranks=np.concatenate(ranks) if len(ranks) > 1 else ranks[0],
                          num_relevant=num_relevant[keep].astype(np.int64))
