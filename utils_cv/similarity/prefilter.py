"""A bfloat16 prefilter for the ranking kernel's sparse depths (``ranking.rank_relevant``).

When only the nearest relevant item, or only ranks within R, are wanted, few entries of a tile
fall under their row's threshold. The kernel can then find them in a bfloat16 product (about
4x cheaper than float32 on CPUs with bfloat16 instructions) and compute the float32 distances
again, through the same ``_mm`` kernel as every other product, only for the rows (or columns)
of the tile that hold one. The results are those of the float32 kernel, bit for bit, because
the filter is conservative:

* Operand rows ``L`` (float32, as ``_Operands`` makes them) become ``L'``: components rounded to
  bfloat16, the squared norm of an l2 operand split into two bfloat16 parts (so it loses
  nothing), and for cosine a constant column that shifts every value by +1 (values stay >= 0).
  With the residuals ``e = L - L'``:
  ``|L.R - L'.R'| <= |e_L||R| + |L||e_R| + |e_L||e_R|`` (Cauchy-Schwarz).
* The float32 product and the bfloat16 one (float32 accumulation) each add at most
  ``g_K |L||R|`` for a K-term sum (``g_K = K u / (1 - K u)``, ``u = 2**-24``).
* So an entry whose float32 distance ``d32`` is at most the threshold ``t`` has a bfloat16
  accumulator at most ``T = t + shift + E``, and rounding to the nearest bfloat16 is monotone:
  the entry's bfloat16 value is at most ``T`` rounded up. Non-negative bfloat16 values order as
  their bits read as int16 (negative ones read as negative), so the test is an int16 comparison.

Whether to use it is decided once per process (:func:`usable`): bfloat16 products must be at
least twice as fast as float32 here and must stay within the bound on a random check.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

_U = 2.0 ** -24
_SLACK = 1.0 + 1e-6  # the bound's own float64 arithmetic
_FLOOR = 1e-35  # flushed subnormal products, absolute
_DENSE = 0.5  # candidates a row in a read above which a tile is computed in float32 after all


@dataclass
class Operand:
    """bfloat16 operand rows with each float32 row's norm and residual norm (float64)."""

    bf16: torch.Tensor
    norm: np.ndarray
    resid: np.ndarray
    width: int  # K of the float32 operand


def operand(rows: torch.Tensor, cosine: bool, right: bool) -> Operand:
    """The filter's operand for float32 operand rows ``rows`` of ``_Operands`` (l2 left
    ``[x, |x|^2, 1]``, l2 right ``[-2y, 1, |y|^2]``, cosine ``x/|x|`` or ``-y/|y|``)."""
    n = len(rows)
    if cosine:
        b = rows.bfloat16()
        resid = rows - b.float()
        out = torch.cat([b, torch.ones(n, 1, dtype=torch.bfloat16)], 1)
    else:
        body, norm = rows[:, :-2], rows[:, -1 if right else -2]
        b = body.bfloat16()
        hi = norm.bfloat16()
        lo = (norm - hi.float()).bfloat16()
        rest = norm - hi.float() - lo.float()
        one = torch.ones(n, 2, dtype=torch.bfloat16)
        split = torch.stack([hi, lo], 1)
        out = torch.cat([b, one, split] if right else [b, split, one], 1)
        resid = torch.cat([body - b.float(), rest[:, None], torch.zeros(n, 1)], 1)
    return Operand(out.contiguous(), torch.linalg.vector_norm(rows.double(), dim=1).numpy(),
                   torch.linalg.vector_norm(resid.double(), dim=1).numpy(), rows.shape[1])


def bound(norm: np.ndarray, resid: np.ndarray, other: Operand) -> np.ndarray:
    """Largest difference between a bfloat16 accumulator and the float32 distance, for rows of
    the given norms against any row of ``other``."""
    big, small = float(other.norm.max(initial=0.0)), float(other.resid.max(initial=0.0))
    k = other.width + 4
    g32, g16 = other.width * _U / (1 - other.width * _U), k * _U / (1 - k * _U)
    cross = resid * big + norm * small + resid * small
    acc = g32 * norm * big + 2 * g16 * (norm + resid) * (big + small)
    return (cross + acc) * _SLACK + _FLOOR


def threshold_bits(t: np.ndarray, extra: np.ndarray, shift: float) -> np.ndarray:
    """``t + shift + extra`` rounded up to a bfloat16, as its int16 bits (at least 0); rows with
    a NaN threshold get the smallest int16 (only -0.0 reaches it, and the exact test drops it)."""
    v = np.maximum(t.astype(np.float64) + shift + extra, 0.0)
    f = v.astype(np.float32)
    f = np.where(f < v, np.nextafter(f, np.float32(np.inf)), f)
    bits = f.view(np.uint32)
    hi = (bits >> 16) + ((bits & 0xFFFF) != 0)
    out = np.minimum(hi, 0x7F80).astype(np.int16)
    out[np.isnan(t)] = np.iinfo(np.int16).min
    return out


def count_tile(lad, bits: np.ndarray, left_op: torch.Tensor, right_op: torch.Tensor, lb: Operand, rb: Operand,
               reads: list, col_cls: np.ndarray, mm) -> bool:
    """Count one tile known as the int16 bits of its bfloat16 product, for each read ``(r0, c0,
    row classes, by_columns)`` of ``ranking._Ladders.count``, and return True; or count nothing
    and return False when the candidates are dense enough that the float32 tile pays (more than
    ``_DENSE`` of them a row in a read: most rows would need their float32 products anyway).
    Candidates are found under each row's bound; their float32 distances come from products
    (``mm``, the kernel of every other product) of the rows, or columns, that hold one; entries
    above the exact thresholds are dropped."""
    found = []
    mask = lad.mask[: bits.size].reshape(bits.shape)
    for r0, _, _, by_columns in reads:
        n = bits.shape[1] if by_columns else bits.shape[0]
        t = lad.threshold[r0 : r0 + n]
        own, other = (rb, lb) if by_columns else (lb, rb)
        limit = threshold_bits(t, bound(own.norm, own.resid, other), lad.shift)
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
            v = mm(left_op, right_op[torch.from_numpy(held)]).numpy()[a, at]
        else:
            v = mm(left_op[torch.from_numpy(held)], right_op).numpy()[at, b]
        keep = v <= (t[b] if by_columns else t[a])
        if keep.any():
            lad.place(a[keep], b[keep], v[keep], r0, c0, bits.shape, row_cls, col_cls, by_columns)
    return True


@lru_cache(maxsize=1)
def usable() -> bool:
    """True where bfloat16 products are at least twice as fast as float32 ones and stay within
    :func:`bound` on random rows (checked once per process)."""
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(512, 64, generator=g) * 3
        left = torch.cat([x, (x * x).sum(1, keepdim=True), torch.ones(512, 1)], 1)
        right = torch.cat([-2 * x.flip(0), torch.ones(512, 1), (x * x).sum(1, keepdim=True).flip(0)], 1)
        lb, rb = operand(left, False, False), operand(right, False, True)
        d16 = (lb.bf16 @ rb.bf16.T).float()
        d32 = left @ right.T
        e = torch.from_numpy(bound(lb.norm, lb.resid, rb)).float()[:, None]
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
