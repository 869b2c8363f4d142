"""Would a bfloat16 prefilter make the R-limited metrics (R-precision, MAP@R) cheaper?

    .venv/bin/python benchmarks/bench_bf16_filter.py [--n 100000] [--d 128] [--classes 1000]

A feasibility measurement for ``utils_cv/similarity/ranking.py``, not a path of the library.
On the data of ``bench_metrics.py`` (seeded, clustered, rows in class order) it asks two things:

1. How many entries of a tile pass a *rigorous* bfloat16 filter, against the exact float32
   candidates? Rows are augmented as ``[x, nh, nl, 1, 1] . [-2y, 1, 1, mh, ml]``, where ``nh``
   is the squared norm rounded to bfloat16 and ``nl`` the float32 rest, so the norms lose
   nothing. With ``u = 2**-8``, ``e_x = bf16(x) - x`` and ``g`` the float32 accumulation bound
   of a 134-term sum, an entry whose float32 distance ``d32`` is at most ``t`` has a bfloat16
   accumulator ``A <= t + E`` with
   ``E = 2(|e_x||y| + |x||e_y| + |e_x||e_y|) + u(|nl| + |ml|) + 2g(|x|^2 + |y|^2 + 2|x||y|)``
   (the column terms at their tile maxima), and rounding to the nearest bfloat16 is monotone,
   so ``bf16(A) <= bf16_up(t + E)``: the test never misses a candidate. The thresholds ``t`` are
   the final ones of the R-limited ranking (each sampled row's R-th nearest other item), the
   lowest that ranking reaches.
2. What each step of a 2,048 x 2,048 tile costs in both ways, in the same run.
3. How dense the float32 candidates are inside a real run of the current kernel, where the
   thresholds come down only as counts arrive (``--in-run``; it counts in a subclass of the
   kernel's private ``_Ladders``).

A pass counts missed candidates too; any would be a fault of the bound.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

U = 2.0 ** -8
G = 134 * 2.0 ** -24 / (1 - 134 * 2.0 ** -24)
TILE = 2048


def best_ms(f, n: int = 30) -> float:
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def data(n: int, d: int, c: int):
    """The data of bench_metrics.py, rows in class order."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(c, d)).astype(np.float32)
    y = rng.integers(0, c, n)
    x = (centers[y] + rng.normal(scale=1.2, size=(n, d))).astype(np.float32)
    order = np.argsort(y, kind="stable")
    return torch.from_numpy(x[order]), y[order]


def bf16_up(v: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 not below each float32 value, as int16 bits (values >= 0)."""
    b = v.clamp_min(0).bfloat16()
    low = b.float() < v
    return (b.view(torch.int16) + low.to(torch.int16)).numpy()


def filter_counts(x: torch.Tensor, y: np.ndarray, rows: np.ndarray, n_tiles: int) -> list[tuple]:
    """(tile, sampled rows, exact candidates, bf16 passes, missed, bound mean) per tile."""
    n = len(x)
    norm = (x * x).sum(1)
    xn = torch.linalg.vector_norm(x, dim=1)
    ex = torch.linalg.vector_norm(x.bfloat16().float() - x, dim=1)
    nh = norm.bfloat16().float()
    nl = norm - nh
    # exact R-limited thresholds: each sampled row's R-th nearest other item (R = class size - 1)
    sizes = np.bincount(y)
    thr = np.empty(len(rows), np.float32)
    for a in range(0, len(rows), 256):
        r = rows[a : a + 256]
        d = norm[r, None] + norm[None, :] - 2 * x[r] @ x.T
        d[np.arange(len(r)), r] = np.inf
        thr[a : a + 256] = torch.sort(d, 1).values[np.arange(len(r)), sizes[y[r]] - 2].numpy()
    out = []
    rng = np.random.default_rng(1)
    blocks = range(0, n - TILE + 1, TILE)
    for _ in range(n_tiles):
        i0, j0 = (int(v) for v in rng.choice(list(blocks), 2, replace=False))
        inside = np.flatnonzero((rows >= i0) & (rows < i0 + TILE))
        rr = rows[inside] - i0
        ii, jj = np.arange(i0, i0 + TILE), np.arange(j0, j0 + TILE)
        left = torch.cat([x[ii], norm[ii, None], torch.ones(TILE, 1)], 1)
        right = torch.cat([-2 * x[jj], torch.ones(TILE, 1), norm[jj, None]], 1)
        d32 = (left @ right.T)[rr]
        lb = torch.cat([x[ii], nh[ii, None], nl[ii, None], torch.ones(TILE, 2)], 1).bfloat16()
        rb = torch.cat([-2 * x[jj], torch.ones(TILE, 2), nh[jj, None], nl[jj, None]], 1).bfloat16()
        d16 = (lb @ rb.T)[rr]
        ymax, eymax, mlmax, nmax = xn[jj].max(), ex[jj].max(), nl[jj].abs().max(), norm[jj].max()
        e = (2 * (ex[ii] * ymax + xn[ii] * eymax + ex[ii] * eymax) + U * (nl[ii].abs() + mlmax)
             + 2 * G * (norm[ii] + nmax + 2 * xn[ii] * ymax))[rr]
        t = torch.from_numpy(thr[inside])
        exact = d32 <= t[:, None]
        passed = torch.from_numpy(d16.view(torch.int16).numpy() <= bf16_up(t + e)[:, None])
        out.append(((i0, j0), len(rr), int(exact.sum()), int(passed.sum()), int((exact & ~passed).sum()),
                    float(e.mean())))
    return out


def tile_costs(k: int) -> list[tuple[str, float]]:
    """Milliseconds per step on one tile, both ways."""
    torch.manual_seed(0)
    a32, b32, o32 = torch.randn(TILE, 130), torch.randn(TILE, 130), torch.empty(TILE, TILE)
    a16, b16 = torch.randn(TILE, 134).bfloat16(), torch.randn(TILE, 134).bfloat16()
    o16 = torch.empty(TILE, TILE, dtype=torch.bfloat16)
    torch.mm(a32, b32.T, out=o32)
    t32 = torch.quantile(o32[:, :512], 0.02, dim=1)  # about 2 % of the entries under their row's threshold
    mask = torch.empty(TILE, TILE, dtype=torch.bool)
    torch.mm(a16, b16.T, out=o16)
    bits, m = o16.view(torch.int16).numpy(), mask.numpy()
    t16 = np.quantile(bits[:, :512], 0.0005, axis=1).astype(np.int16)  # a sparse pass, as in question 1
    x = np.random.default_rng(0).random((TILE, 130), dtype=np.float32)
    ri, ci = np.random.default_rng(1).integers(0, TILE, (2, k))
    return [
        ("float32 product (130 wide)", best_ms(lambda: torch.mm(a32, b32.T, out=o32))),
        ("bfloat16 product (134 wide)", best_ms(lambda: torch.mm(a16, b16.T, out=o16))),
        ("float32 comparison with row thresholds (torch)", best_ms(lambda: torch.le(o32, t32[:, None], out=mask))),
        ("bfloat16 comparison with row thresholds (torch)", best_ms(lambda: torch.le(o16, t32[:, None].bfloat16(), out=mask))),
        ("bfloat16 bits as int16, row thresholds (numpy)", best_ms(lambda: np.less_equal(bits, t16[:, None], out=m))),
        ("bfloat16 bits as int16, column thresholds (numpy)", best_ms(lambda: np.less_equal(bits, t16[None, :], out=m))),
        ("flatnonzero of a sparse mask", best_ms(lambda: np.flatnonzero(m))),
        ("nonzero 64-bit words of a sparse mask", best_ms(lambda: np.flatnonzero(m.view(np.uint64)))),
        (f"{k:,} candidate pairs recomputed (gather + einsum)", best_ms(lambda: np.einsum("ij,ij->i", x[ri], x[ci]))),
    ]


def in_run_density(x: torch.Tensor, y: np.ndarray) -> list[tuple[str, float, float]]:
    """(metrics, share of rows with a candidate, candidates per row) over every tile read."""
    from utils_cv.similarity import metrics, ranking

    seen = {"rows": 0, "hit": 0, "candidates": 0}

    class Counting(ranking._Ladders):
        def count(self, d, r0, c0, row_cls, col_cls, by_columns, mask):
            n = d.shape[1] if by_columns else d.shape[0]
            t = self.threshold[r0 : r0 + n]
            m = d <= (t[None, :] if by_columns else t[:, None])
            seen["rows"] += n
            seen["hit"] += int((m.any(0) if by_columns else m.any(1)).sum())
            seen["candidates"] += int(m.sum())
            return super().count(d, r0, c0, row_cls, col_cls, by_columns, mask)

    out, plain, workers = [], ranking._Ladders, ranking._WORKERS
    ranking._Ladders, ranking._WORKERS = Counting, 1  # one thread: the counts above are not locked
    try:
        for names in (("precision@1", "r_precision", "map@r"), ("recall", "mrr")):
            seen.update(rows=0, hit=0, candidates=0)
            metrics.evaluate_retrieval(x.numpy(), y, metrics=names)
            out.append((", ".join(names), seen["hit"] / seen["rows"], seen["candidates"] / seen["rows"]))
    finally:
        ranking._Ladders, ranking._WORKERS = plain, workers
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50, help="sample every k-th row")
    parser.add_argument("--tiles", type=int, default=8)
    parser.add_argument("--in-run", action="store_true", help="also count the candidates inside a real run")
    args = parser.parse_args()
    x, y = data(args.n, args.d, args.classes)
    rows = np.arange(0, args.n, args.every)
    print(f"{args.n:,} x {args.d} in {args.classes} classes, every {args.every}th row sampled, {args.tiles} random "
          f"off-diagonal tiles, torch {torch.get_num_threads()} threads\n")
    print("| tile (rows, columns) | sampled rows | exact candidates | bf16 passes | ratio | missed | bound mean |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    total = [0, 0, 0, 0]
    for (i0, j0), nr, ex, ps, miss, em in filter_counts(x, y, rows, args.tiles):
        total = [total[0] + nr, total[1] + ex, total[2] + ps, total[3] + miss]
        print(f"| {i0}, {j0} | {nr} | {ex} | {ps} | {ps / max(ex, 1):.2f} | {miss} | {em:.2f} |")
    print(f"| all | {total[0]} | {total[1]} | {total[2]} | {total[2] / max(total[1], 1):.2f} | {total[3]} | |")
    per_row = total[2] / max(total[0], 1)
    print(f"\nbf16 passes per row and tile: {per_row:.2f} (a tile of {TILE} rows: about {per_row * TILE:,.0f})\n")
    costs = tile_costs(k=max(1, int(round(2 * per_row * TILE))))
    print("| one 2,048 x 2,048 tile | ms |")
    print("|---|---:|")
    for name, ms in costs:
        print(f"| {name} | {ms:.2f} |")
    c = dict(costs)
    find = min(c["flatnonzero of a sparse mask"], c["nonzero 64-bit words of a sparse mask"])
    now = c["float32 product (130 wide)"] + 2 * c["float32 comparison with row thresholds (torch)"] + 2 * find
    k = [name for name in c if name.endswith("(gather + einsum)")][0]
    bf = (c["bfloat16 product (134 wide)"] + c["bfloat16 bits as int16, row thresholds (numpy)"]
          + c["bfloat16 bits as int16, column thresholds (numpy)"] + 2 * find + c[k])
    print(f"\na tile read by rows and by columns, candidates found (placing them is left out): float32 {now:.2f} ms "
          f"(product, 2 comparisons, 2 scans); bfloat16 {bf:.2f} ms (product, 2 comparisons of the bits, 2 scans, "
          f"the passed pairs recomputed): {now / bf:.1f}x")
    if args.in_run:
        print("\n| float32 candidates inside a real run, metrics= | rows with a candidate, per read | candidates a row, per read |")
        print("|---|---:|---:|")
        for names, hit, per in in_run_density(x, y):
            print(f"| {names} | {hit:.3f} | {per:.2f} |")

if __name__ == "__main__":
    main()
