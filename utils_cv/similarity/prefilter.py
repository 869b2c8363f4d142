"""A bfloat16 prefilter for the ranking kernel's sparse depths (``ranking.rank_relevant``).

When only the nearest relevant item, or only ranks within R, are wanted, few entries of a tile
fall under their row's threshold. The kernel can then find them in a bfloat16 product (about
4x cheaper than float32 on CPUs with bfloat16 instructions) and compute the float32 distances
again, through the same ``_mm`` kernel as every other product, only for the rows (or columns)
of the tile that hold one. The results are those of the float32 kernel, bit for bit, because
the filter is conservative:

* Operand rows ``L`` (float32, as ``_Operands`` makes them) become ``L'``: the body (``x``,
  ``-2y`` or a unit row) rounded to bfloat16, the squared norm of an l2 operand split into two
  bfloat16 parts (its rest below the second is kept in the bound), and for cosine a constant
  column that shifts every value by +1 (values stay >= 0). With the bodies' residuals ``e``:
  ``|L.R - L'.R'| <= |e_L||R_b| + |L_b||e_R| + |e_L||e_R| + rest_L + rest_R`` (Cauchy-Schwarz on
  the bodies ``_b``; a norm column meets a constant 1).
* The float32 product and the bfloat16 one (float32 accumulation) each add at most
  ``g_K`` times the sum of the absolute products (``g_K = K u / (1 - K u)``, ``u = 2**-24``).
* So an entry whose float32 distance ``d32`` is at most the threshold ``t`` has a bfloat16
  accumulator at most ``T = t + shift + E``, and rounding to the nearest bfloat16 is monotone:
  the entry's bfloat16 value is at most ``T`` rounded up. Non-negative bfloat16 values order as
  their bits read as int16 (negative ones read as negative), so the test is an int16 comparison.
  In practice the output rounding (2**-8) absorbs the accumulation terms; they are kept so that
  the bound holds without that argument.

Whether to use it is decided once per process (:func:`usable`): bfloat16 products must be at
least twice as fast as float32 here and must stay within the bound on a random check.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch

_U = 2.0 ** -24
_SLACK = 1.0 + 1e-3  # the bound's own float64 arithmetic and second-order terms
_CACHE_BYTES = 64 * 1024 * 1024  # row blocks' operands kept for the next column blocks
_TINY = 2.0 ** -126  # smallest normal float32: bfloat16 products flush what is below, at each step
_DENSE = 0.5  # candidates a row in a read above which a tile is computed in float32 after all


@dataclass
class Operand:
    """bfloat16 operand rows, with what the bound needs of each row (float64): the norm of its
    body (``x - mu``, ``-2(y - mu)`` or the unit row), of the body's rounding residual, the
    squared-norm column (l2) and its rest after the split, and the size of the float32 row
    (``|x|`` uncentred, ``|x| + |mu|`` for the centring)."""

    bf16: torch.Tensor
    body: np.ndarray
    resid: np.ndarray
    scalar: np.ndarray
    rest: np.ndarray
    raw: np.ndarray
    reach: np.ndarray
    width: int  # K of the float32 operand
    cosine: bool


def operand(rows: torch.Tensor, cosine: bool, right: bool, mu: np.ndarray | None = None) -> Operand:
    """The filter's operand for float32 operand rows ``rows`` of ``_Operands`` (l2 left
    ``[x, |x|^2, 1]``, l2 right ``[-2y, 1, |y|^2]``, cosine ``x/|x|`` or ``-y/|y|``). l2 rows are
    centred on ``mu`` first (distances do not change; bfloat16 keeps 8 bits of the rows' spread
    instead of their offset)."""
    n = len(rows)
    zeros = np.zeros(n)
    if cosine:
        body = rows.double()
        raw = torch.linalg.vector_norm(body, dim=1).numpy()
        b = rows.bfloat16()
        out = torch.cat([b, torch.ones(n, 1, dtype=torch.bfloat16)], 1)
        scalar, rest, reach = zeros, zeros, raw
    else:
        x = rows[:, :-2].double() / (-2.0 if right else 1.0)  # exact: the operand is x or -2y
        raw = torch.linalg.vector_norm(x, dim=1).numpy()
        c = x - torch.from_numpy(mu if mu is not None else np.zeros(x.shape[1]))
        body = -2.0 * c if right else c
        b = body.float().bfloat16()
        norm = (c * c).sum(1)
        hi = norm.float().bfloat16()
        lo = (norm - hi.double()).float().bfloat16()
        split = torch.stack([hi, lo], 1)
        one = torch.ones(n, 2, dtype=torch.bfloat16)
        out = torch.cat([b, one, split] if right else [b, split, one], 1)
        scalar = norm.numpy()
        rest = (norm - hi.double() - lo.double()).abs().numpy()
        reach = raw + (float(np.linalg.norm(mu)) if mu is not None else 0.0)
    resid = torch.linalg.vector_norm(body - b.double(), dim=1).numpy()
    return Operand(out.contiguous(), torch.linalg.vector_norm(body, dim=1).numpy(), resid, scalar, rest, raw, reach,
                   rows.shape[1], cosine)


def bound(own: Operand, other: Operand) -> np.ndarray:
    """Largest difference between a bfloat16 accumulator and the float32 distance, for each row
    of ``own`` against any row of ``other``. Part by part: the bodies' rounding (Cauchy-Schwarz
    on the residuals), the split norms' rest, the bfloat16 product's float32 accumulation over
    its sum of absolute products (the factor 2 covers the split norm's two parts and the
    residuals), the float32 product's over its own (``(|x| + |y|)^2`` for l2) and, for l2, the
    float32 rounding of the operands' squared norms, the centring's float64 rounding, and
    subnormal values flushed at each step. Output rounding is covered by rounding the threshold
    up (:func:`threshold_bits`)."""
    big, small = float(other.body.max(initial=0.0)), float(other.resid.max(initial=0.0))
    scalar, rest = float(other.scalar.max(initial=0.0)), float(other.rest.max(initial=0.0))
    raw, reach = float(other.raw.max(initial=0.0)), float(other.reach.max(initial=0.0))
    k = other.width + 4
    g32, g16 = other.width * _U / (1 - other.width * _U), k * _U / (1 - k * _U)
    cross = own.resid * big + own.body * small + own.resid * small + own.rest + rest
    const = 1.0 if own.cosine else 0.0
    acc16 = 2 * g16 * ((own.body + own.resid) * (big + small) + own.scalar + scalar + const)
    # l2: the float32 operands' own squared norms carry their float32 rounding (d + 1 terms)
    gd = (other.width - 1) * _U / (1 - (other.width - 1) * _U)
    acc32 = g32 * own.raw * raw if own.cosine else g32 * (own.raw + raw) ** 2 + gd * (own.raw ** 2 + raw ** 2)
    centring = other.width * 2.0 ** -50 * (own.reach + reach) ** 2
    return (cross + acc16 + acc32 + centring) * _SLACK + (k + 1) * _TINY


def threshold_bits(t: np.ndarray, extra: np.ndarray, shift: float) -> np.ndarray:
    """``t + shift + extra`` rounded up to a bfloat16, as its int16 bits (at least 0; at or above
    infinity the largest int16, which every entry passes, an overflowed one included); rows with
    a NaN threshold get the smallest int16 (only -0.0 reaches it, and the exact test drops it)."""
    v = np.maximum(t.astype(np.float64) + shift + extra, 0.0)
    top = float(np.finfo(np.float32).max)
    f = np.minimum(v, top).astype(np.float32)
    with np.errstate(over="ignore"):  # float32's largest steps up to infinity: set below anyway
        f = np.where(f < v, np.nextafter(f, np.float32(np.inf)), f)
    bits = f.view(np.uint32)
    hi = (bits >> 16) + ((bits & 0xFFFF) != 0)
    # at infinity every entry passes, an overflowed (inf or NaN) bfloat16 one too
    out = np.where(hi >= 0x7F80, 0x7FFF, hi).astype(np.int16)
    out[v > top] = 0x7FFF
    out[np.isnan(t)] = np.iinfo(np.int16).min
    return out


def count_tile(lad, bits: np.ndarray, left_op: torch.Tensor, right_op: torch.Tensor, lb: Operand, rb: Operand,
               reads: list, col_cls: np.ndarray, mm, mask: np.ndarray, out: torch.Tensor) -> bool:
    """Count one tile known as the int16 bits of its bfloat16 product, for each read ``(r0, c0,
    row classes, by_columns)`` of ``ranking._Ladders.count``, and return True; or count nothing
    and return False when the candidates are dense enough that the float32 tile pays (more than
    ``_DENSE`` of them a row in a read: most rows would need their float32 products anyway).
    Candidates are found under each row's bound; their float32 distances come from products
    (``mm``, the kernel of every other product) of the rows, or columns, that hold one; entries
    above the exact thresholds are dropped."""
    found = []
    mask = mask[: bits.size].reshape(bits.shape)
    for r0, _, _, by_columns in reads:
        n = bits.shape[1] if by_columns else bits.shape[0]
        t = lad.threshold[r0 : r0 + n]
        own, other = (rb, lb) if by_columns else (lb, rb)
        limit = threshold_bits(t, bound(own, other), lad.shift)
        np.less_equal(bits, limit[None, :] if by_columns else limit[:, None], out=mask)
        _, a, b = lad.positions(mask)
        if len(a) > _DENSE * n:
            return False
        found.append((a, b, t))
    for (a, b, t), (r0, c0, row_cls, by_columns) in zip(found, reads):
        if not len(a):
            continue
        held, at = np.unique(b if by_columns else a, return_inverse=True)
        if by_columns:
            d = out[: len(left_op) * len(held)].view(len(left_op), len(held))
            v = mm(left_op, right_op[torch.from_numpy(held)], out=d).numpy()[a, at]
        else:
            d = out[: len(held) * len(right_op)].view(len(held), len(right_op))
            v = mm(left_op[torch.from_numpy(held)], right_op, out=d).numpy()[at, b]
        keep = v <= (t[b] if by_columns else t[a])
        if keep.any():
            lad.place(a[keep], b[keep], v[keep], r0, c0, bits.shape, row_cls, col_cls, by_columns)
    return True


class Filter:
    """The prefilter of one ``rank_relevant`` call: the centre of its l2 rows, the row blocks'
    operands, and a switch that turns it off for the rest of the call when most tiles turn out
    dense (more than 3 in 4 after 16 tiles: the float32 path, which they take anyway, is then
    cheaper without the bfloat16 work before it). Shared by the call's worker threads: each
    passes its own ``scratch`` (a bfloat16 tile, a mask and the operand of its column block, in
    attributes ``bf16``, ``mask``, ``right`` and ``rb``); a row block's operand made by two
    workers at once is the same, and a lost count in the switch only delays it."""

    def __init__(self, rows: np.ndarray, cosine: bool, tile: int, n_left: int):
        self.mu = None if cosine else rows.mean(0, dtype=np.float64)
        self.cosine, self.on, self.tried, self.dense, self.tile = cosine, True, 0, 0, tile
        self.left: dict = {}  # row block (its first row) -> its operand, for the first rows that fit _CACHE_BYTES
        # kept in blocks allocated here: made in the workers among their temporaries, the kept
        # operands pinned the workers' heaps (0.2 GB more at 100,000 x 128 with two workers)
        width = rows.shape[1] + (1 if cosine else 4)
        n = min(n_left, _CACHE_BYTES // (2 * width + 6 * 8))
        self.slab, self.slab64 = torch.empty(n, width, dtype=torch.bfloat16), np.empty((6, n))

    def count(self, lad, left_op: torch.Tensor, row_key, reads: list, col_cls: np.ndarray, mm, scratch) -> bool:
        """:func:`count_tile` for the tile ``left_op . scratch.right`` (``row_key`` names its row
        block; the column block's bfloat16 operand ``scratch.rb`` is made here the first time)."""
        right_op = scratch.right
        if scratch.rb is None:
            scratch.rb = operand(right_op, self.cosine, right=True, mu=self.mu)
        if scratch.bf16 is None:
            scratch.bf16 = torch.empty(self.tile * self.tile, dtype=torch.bfloat16)
        rb = scratch.rb
        lb = self.left.get(row_key)
        if lb is None:
            lb = operand(left_op, self.cosine, right=False, mu=self.mu)
            a, b = row_key, row_key + len(left_op)
            if b <= len(self.slab):  # each row block meets every column block
                self.slab[a:b].copy_(lb.bf16)
                fields = ("body", "resid", "scalar", "rest", "raw", "reach")
                for k, name in enumerate(fields):
                    self.slab64[k, a:b] = getattr(lb, name)
                self.left[row_key] = lb = replace(lb, bf16=self.slab[a:b],
                                                  **{name: self.slab64[k, a:b] for k, name in enumerate(fields)})
        done = False  # a centred squared norm beyond bfloat16's range: the float32 path
        if np.isfinite(lb.rest).all() and np.isfinite(rb.rest).all():
            d = scratch.bf16[: len(left_op) * len(right_op)].view(len(left_op), len(right_op))
            bits = torch.mm(lb.bf16, rb.bf16.T, out=d).view(torch.int16).numpy()
            done = count_tile(lad, bits, left_op, right_op, lb, rb, reads, col_cls, mm, scratch.mask, scratch.tile)
        self.tried += 1
        self.dense += not done
        if self.tried >= 16 and self.dense > 0.75 * self.tried:
            self.on = False
        return done


@lru_cache(maxsize=1)
def usable() -> bool:
    """True where bfloat16 products are at least twice as fast as float32 ones and stay within
    :func:`bound` on random rows (checked once per process)."""
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(512, 64, generator=g) * 3
        left = torch.cat([x, (x * x).sum(1, keepdim=True), torch.ones(512, 1)], 1)
        right = torch.cat([-2 * x.flip(0), torch.ones(512, 1), (x * x).sum(1, keepdim=True).flip(0)], 1)
        lb, rb = operand(left, False, False, np.zeros(64)), operand(right, False, True, np.zeros(64))
        d16 = (lb.bf16 @ rb.bf16.T).float()
        d32 = left @ right.T
        e = torch.from_numpy(bound(lb, rb)).float()[:, None]
        if not bool(((d16 - d32).abs() <= e + d16.abs() * 2.0 ** -7).all()):
            return False
        a32, b32 = torch.randn(1024, 130, generator=g), torch.randn(1024, 130, generator=g)
        a16, b16 = a32.bfloat16(), b32.bfloat16()

        def best(f) -> float:
            f()
            times = []
            for _ in range(5):
                t = time.perf_counter()
                f()
                times.append(time.perf_counter() - t)
            return min(times)

        return best(lambda: a16 @ b16.T) * 2 <= best(lambda: a32 @ b32.T)
    except (RuntimeError, TypeError):  # no bfloat16 product on this build
        return False
