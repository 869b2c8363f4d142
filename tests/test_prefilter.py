"""The bfloat16 prefilter of the ranking kernel (utils_cv/similarity/prefilter.py): its bound
holds entry by entry, and ranks found through it equal the float32 kernel's, bit for bit."""
import warnings

import numpy as np
import pytest
import torch

from utils_cv.similarity import prefilter, metrics, ranking


def _clustered(n, d, classes, seed, spread=1.0, scale=1.0, offset=0.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d))
    y = rng.integers(0, classes, n)
    x = (centers[y] + rng.normal(scale=spread, size=(n, d))) * scale + offset
    return np.ascontiguousarray(x, dtype=np.float32), y


def _first(q, yq, r, yr, distance, prefilter, monkeypatch):
    monkeypatch.setattr(ranking, "_PREFILTER", prefilter)
    out = ranking.rank_relevant(q, yq, r, yr, distance, depth="first")
    return out.query.tolist(), out.ranks.tolist(), out.num_relevant.tolist()


def _spy(monkeypatch):
    outcomes = []
    real = prefilter.count_tile

    def spy(*args, **kwargs):
        outcomes.append(real(*args, **kwargs))
        return outcomes[-1]

    monkeypatch.setattr(prefilter, "count_tile", spy)
    return outcomes


@pytest.mark.parametrize("distance,centred", [("l2", False), ("l2", True), ("cosine", False)])
@pytest.mark.parametrize("scale,offset", [(1.0, 0.0), (1e4, 0.0), (1.0, 50.0), (1e-3, 0.0), (1e-3, 1e3)])
def test_operands_bound_every_entry_at_its_own_threshold(distance, centred, scale, offset):
    # the tightest case: each entry's threshold is its own float32 distance, so it must pass
    x, _ = _clustered(300, 24, 6, seed=1, scale=scale, offset=offset)
    ops = ranking._Operands(x, np.arange(len(x)), distance)
    left, right = ops.left(0, 300), ops.right(0, 300)
    d32 = ranking._mm(left, right).numpy()
    mu = x.mean(0, dtype=np.float64) if centred else None
    lb, rb = (prefilter.operand(left, ops.cosine, right=False, mu=mu),
              prefilter.operand(right, ops.cosine, right=True, mu=mu))
    bits = (lb.bf16 @ rb.bf16.T).view(torch.int16).numpy()
    shift = 1.0 if ops.cosine else 0.0
    e_rows = prefilter.bound(lb, rb)
    e_cols = prefilter.bound(rb, lb)
    for i in range(0, 300, 7):
        assert (bits[i] <= prefilter.threshold_bits(d32[i], np.full(300, e_rows[i]), shift)).all()
        assert (bits[:, i] <= prefilter.threshold_bits(d32[:, i], np.full(300, e_cols[i]), shift)).all()
    if offset > 1e5 * scale:
        return  # float32 cannot resolve these distances: a wide bound is right there
    # and the bound is not vacuous: most entries would fail a threshold a little below them
    i = 5
    lower = prefilter.threshold_bits(d32[i] - 4 * e_rows[i] - 0.02 * np.abs(d32[i]) - 1e-30, np.full(300, e_rows[i]), shift)
    assert (bits[i] > lower).mean() > 0.5


def test_threshold_bits_round_up_and_mark_rows_without_threshold():
    rng = np.random.default_rng(0)
    # float64 values between float32 ones (1 + 2**-30 is not a float32; its float32 is a bfloat16),
    # over a wide range, and the edges
    t = np.concatenate([rng.normal(size=500) * 10.0 ** rng.integers(-30, 30, 500), 1 + 2.0 ** -rng.integers(24, 50, 50),
                        [0.0, -0.0, 1e38, 3.4028235e38, 1e39, np.inf, np.nan, -5.0]])
    extra = np.where(rng.random(len(t)) < 0.5, 0.0, np.abs(t) * 1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bits = prefilter.threshold_bits(t, extra, 0.0)
    values = torch.from_numpy(bits.copy()).view(torch.bfloat16).double().numpy()
    finite = ~np.isnan(t) & (t <= 3.4028235e38)
    top = bits == np.iinfo(np.int16).max  # above bfloat16's largest finite value: every entry passes
    assert ((values >= np.maximum(t + extra, 0)) | top)[finite].all()
    assert (bits[t > 3.4028235e38] == np.iinfo(np.int16).max).all()  # every bit pattern passes, NaN's too
    assert bits[np.isnan(t)].tolist() == [np.iinfo(np.int16).min]
    # and not more than needed: one bfloat16 step below is below the value
    ok = finite & (t > 1e-30) & (t < 1e38)
    below = torch.from_numpy((bits[ok] - 1).astype(np.int16)).view(torch.bfloat16).double().numpy()
    assert (below < t[ok] + extra[ok]).all()


def test_products_of_row_or_column_subsets_equal_the_whole_tile_bit_for_bit():
    # what the prefilter's recomputation rests on (as do the per-class products of the ladders)
    x, _ = _clustered(700, 130, 9, seed=2)
    ops = ranking._Operands(x, np.arange(len(x)), "l2")
    left, right = ops.left(0, 700), ops.right(0, 640)
    whole = ranking._mm(left, right).numpy()
    rng = np.random.default_rng(3)
    for k in (1, 3, 15, 16, 17, 100, 513):
        rows = np.sort(rng.choice(700, k, replace=False))
        cols = np.sort(rng.choice(640, k, replace=False))
        assert np.array_equal(ranking._mm(left[torch.from_numpy(rows)], right).numpy(), whole[rows])
        assert np.array_equal(ranking._mm(left, right[torch.from_numpy(cols)]).numpy(), whole[:, cols])


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("tile", [256, 64, 37])
def test_first_ranks_through_the_prefilter_equal_the_float32_kernel(monkeypatch, distance, tile):
    monkeypatch.setattr(ranking, "_TILE", tile)
    x, y = _clustered(900, 16, 30, seed=4, spread=0.6)
    y[:3] = 1000 + np.arange(3)  # queries without a relevant item
    outcomes = _spy(monkeypatch)
    for args in ((x, y, None, None), (x[:300], y[:300], x[300:], y[300:])):
        plain = _first(*args, distance, False, monkeypatch)
        assert _first(*args, distance, True, monkeypatch) == plain
    assert True in outcomes  # the filter did the work on some tiles
    monkeypatch.setattr(prefilter, "_CACHE_BYTES", 0)  # row blocks' operands made again each time
    assert _first(x, y, None, None, distance, True, monkeypatch) == _first(x, y, None, None, distance, False, monkeypatch)
    monkeypatch.setattr(prefilter, "_CACHE_BYTES", 400 * 100)  # the blocks of the first ~450 rows kept, the rest made again
    assert _first(x, y, None, None, distance, True, monkeypatch) == _first(x, y, None, None, distance, False, monkeypatch)
    monkeypatch.setattr(ranking, "_STATE_BYTES", 16 * 200)  # queries in chunks: no symmetric tiles
    assert _first(x, y, None, None, distance, True, monkeypatch) == _first(x, y, None, None, distance, False, monkeypatch)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_prefilter_keeps_ties_and_duplicates_in_order(monkeypatch, distance):
    # integer rows (many exact ties) and exact copies of rows under other labels, large norms
    rng = np.random.default_rng(5)
    x = rng.integers(-3, 4, size=(400, 6)).astype(np.float32) * 1000
    x[200:260] = x[:60]
    y = rng.integers(0, 8, 400)
    monkeypatch.setattr(ranking, "_TILE", 64)
    for args in ((x, y, None, None), (x[:150], y[:150], x[150:], y[150:])):
        assert _first(*args, distance, True, monkeypatch) == _first(*args, distance, False, monkeypatch)
    monkeypatch.setattr(ranking, "_PREFILTER", True)
    fast = metrics.evaluate_retrieval(x, y, distance=distance, metrics=("recall", "precision@1", "mrr"))
    monkeypatch.setattr(ranking, "_PREFILTER", False)
    assert metrics.evaluate_retrieval(x, y, distance=distance, metrics=("recall", "precision@1", "mrr")) == fast


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_exact_copies_through_filtered_tiles_tie_by_index(monkeypatch, distance):
    # copies of rows under another label and under the same one, in tiles the filter handles
    x, y = _clustered(900, 16, 30, seed=12, spread=0.6)
    x[100:200], y[100:200] = x[:100], (y[:100] + 1) % 30
    x[600:700], y[600:700] = x[:100], y[:100]
    monkeypatch.setattr(ranking, "_TILE", 64)
    outcomes = _spy(monkeypatch)
    assert _first(x, y, None, None, distance, True, monkeypatch) == _first(x, y, None, None, distance, False, monkeypatch)
    assert outcomes.count(True) > len(outcomes) / 2


def test_rows_at_the_edge_of_the_range_and_subnormal_rows_stay_exact(monkeypatch):
    # a centred squared norm beyond bfloat16's range (the float32 path takes the tile) ...
    big = np.float32(9.22e18)
    q = np.zeros((10, 2), np.float32)
    q[:, 0] = big
    r = np.zeros((50, 2), np.float32)
    r[:, 0], r[:, 1] = -big, np.arange(50) * 1e15
    yq, yr = np.r_[0, [99] * 9], np.r_[[1] * 49, 0]
    assert _first(q, yq, r, yr, "l2", True, monkeypatch) == _first(q, yq, r, yr, "l2", False, monkeypatch)
    # ... and rows so small that bfloat16 products flush them at every step of a long sum: equal
    # rows (distance 0, the nearest relevant item too) whose bfloat16 value is the two norms
    x = np.full((32, 2048), 7e-20, np.float32)
    x[16:] *= -1
    y = np.arange(32) % 4
    monkeypatch.setattr(ranking, "_TILE", 16)  # copies in tiles off the diagonal
    outcomes = _spy(monkeypatch)
    assert _first(x, y, None, None, "l2", True, monkeypatch) == _first(x, y, None, None, "l2", False, monkeypatch)
    assert outcomes


def test_dense_tiles_fall_back_to_float32_with_equal_results(monkeypatch):
    # labels that do not follow the data: the nearest relevant item is far, most entries are
    # candidates, and tiles go to the float32 path; the rows of classes of one come first (lower
    # labels) and have no candidate, so their tiles stay filtered
    x, _ = _clustered(600, 8, 4, seed=6)
    y = 300 + np.random.default_rng(7).integers(0, 3, 600)
    y[:300] = np.arange(300)
    monkeypatch.setattr(ranking, "_TILE", 64)
    outcomes = _spy(monkeypatch)
    assert _first(x, y, None, None, "l2", True, monkeypatch) == _first(x, y, None, None, "l2", False, monkeypatch)
    assert True in outcomes and False in outcomes


def test_filter_turns_itself_off_when_most_tiles_are_dense(monkeypatch):
    x, _ = _clustered(800, 8, 4, seed=9)
    y = np.random.default_rng(10).permutation(800) // 2  # pairs at random: the partner is far, every tile dense
    monkeypatch.setattr(ranking, "_TILE", 32)
    monkeypatch.setattr(ranking, "_WORKERS", 1)
    outcomes = _spy(monkeypatch)
    assert _first(x, y, None, None, "l2", True, monkeypatch) == _first(x, y, None, None, "l2", False, monkeypatch)
    assert outcomes == [False] * 16  # then the float32 path for the other 309 tiles
    # with two workers, the other one's tile in hand when the switch turns (and a count lost to
    # the race) may still try it
    monkeypatch.setattr(ranking, "_WORKERS", 2)
    outcomes.clear()
    assert _first(x, y, None, None, "l2", True, monkeypatch) == _first(x, y, None, None, "l2", False, monkeypatch)
    assert 16 <= len(outcomes) <= 18 and not any(outcomes)


@pytest.mark.parametrize("scale,offset", [(10.0, 0.0), (1.0, 30.0)])
def test_far_from_the_origin_l2_rows_are_still_filtered(monkeypatch, scale, offset):
    # the bound scales with the rows' spread, not their norm: l2 rows are centred for the filter
    x, y = _clustered(1500, 32, 40, seed=11, spread=0.5, scale=scale, offset=offset)
    monkeypatch.setattr(ranking, "_TILE", 256)
    outcomes = _spy(monkeypatch)
    assert _first(x, y, None, None, "l2", True, monkeypatch) == _first(x, y, None, None, "l2", False, monkeypatch)
    assert outcomes.count(True) > len(outcomes) / 2


def test_only_the_nearest_relevant_depth_uses_it(monkeypatch):
    calls = []
    real = prefilter.count_tile
    monkeypatch.setattr(prefilter, "count_tile", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(ranking, "_PREFILTER", True)
    x, y = _clustered(300, 8, 10, seed=8)
    metrics.evaluate_retrieval(x, y)
    metrics.evaluate_retrieval(x, y, metrics=("r_precision", "map@r"))
    assert not calls
    metrics.evaluate_retrieval(x, y, metrics=("recall", "mrr"))
    assert calls


def test_usable_is_decided_once_and_is_a_bool():
    assert prefilter.usable() in (True, False)
    assert prefilter.usable.cache_info().currsize == 1
