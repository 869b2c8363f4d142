import numpy as np
import pytest
import torch

from utils_cv.similarity import data, metrics, ranking
from utils_cv.similarity.distances import sq_norms, squared_l2_


def col(*v):
    return np.array(v, dtype=np.float32)[:, None]


def test_perfect_retrieval_scores_one():
    r = metrics.evaluate_retrieval(col(0, 1, 10, 11), ["a", "a", "b", "b"])
    for key in ("recall@1", "recall@8", "precision@1", "r_precision", "map@r", "map", "mrr"):
        assert r[key] == 1.0, key
    assert r["num_queries"] == 4 and r["num_excluded"] == 0


def test_hand_computed_leave_one_out_with_ties():
    # ranks of the single relevant item: q0 -> 2, q1 -> 3 (tie 0/2 at distance 1), q2 -> 3, q3 -> 2
    r = metrics.evaluate_retrieval(col(0, 1, 2, 3), ["a", "b", "a", "b"], ks=(1, 2, 4))
    assert r["recall@1"] == 0.0 and r["precision@1"] == 0.0
    assert r["recall@2"] == 0.5 and r["recall@4"] == 1.0
    assert r["r_precision"] == 0.0 and r["map@r"] == 0.0
    assert r["mrr"] == pytest.approx(5 / 12) and r["map"] == pytest.approx(5 / 12)


def test_tie_between_relevant_and_not_goes_to_lower_index():
    # query 0 at 0; item 1 at -1 and item 2 at +1 are equally far: the lower index ranks first
    ranks, kept = metrics.relevant_ranks(col(0, -1, 1), ["a", "b", "a"])
    assert kept.tolist() == [0, 2] and ranks[0].tolist() == [2] and ranks[1].tolist() == [1]
    assert metrics.evaluate_retrieval(col(0, -1, 1), ["a", "b", "a"])["recall@1"] == 0.5
    r = metrics.evaluate_retrieval(col(0, -1, 1), ["a", "a", "b"])
    ranks, kept = metrics.relevant_ranks(col(0, -1, 1), ["a", "a", "b"])
    assert kept.tolist() == [0, 1] and ranks[0].tolist() == [1] and ranks[1].tolist() == [1]
    assert r["num_excluded"] == 1


def test_map_at_r_with_two_relevant_items():
    # reference ranked: a (rank 1), b (rank 2), a (rank 3); R = 2
    r = metrics.evaluate_retrieval(col(0), ["a"], col(1, 2, 3), ["a", "b", "a"])
    assert r["r_precision"] == 0.5
    assert r["map@r"] == pytest.approx(0.5)
    assert r["map"] == pytest.approx((1 + 2 / 3) / 2)
    assert r["recall@1"] == 1.0 and r["mrr"] == 1.0


def test_query_without_relevant_item_is_excluded_and_counted(caplog):
    r = metrics.evaluate_retrieval(col(0, 1, 5), ["a", "a", "lonely"], ks=(1, 8))
    assert r["num_excluded"] == 1 and r["num_queries"] == 2
    assert r["recall@1"] == 1.0 and r["recall@8"] == 1.0  # k beyond the gallery size is fine
    assert "no relevant item" in caplog.text
    with pytest.raises(ValueError, match="No query has a relevant item"):
        metrics.evaluate_retrieval(col(0, 1), ["a", "b"])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="query_labels"):
        metrics.evaluate_retrieval(col(0, 1), ["a"])
    with pytest.raises(ValueError, match="reference_labels"):
        metrics.evaluate_retrieval(col(0, 1), ["a", "a"], col(0, 1))
    with pytest.raises(ValueError, match="'ks'"):
        metrics.evaluate_retrieval(col(0, 1), ["a", "a"], ks=(0,))
    with pytest.raises(ValueError, match="'distance'"):
        metrics.evaluate_retrieval(col(0, 1), ["a", "a"], distance="manhattan")


def test_rows_whose_distances_would_overflow_float32_are_refused_by_name():
    huge = np.array([[1.5e19], [1.5e19], [0.0], [1.0]], dtype=np.float32)
    with pytest.raises(ValueError, match="'query'.*overflow"):
        metrics.evaluate_retrieval(huge, [0, 1, 2, 2])
    with pytest.raises(ValueError, match="'reference'.*overflow"):
        metrics.evaluate_retrieval(col(0, 1), ["a", "b"], huge, [0, 1, "a", "b"])
    # large but safe: every distance stays finite, and the ranks are those of the exact reference
    big = np.array([[4e18, 0], [4e18, 1e18], [0, 0], [1e18, 0]], dtype=np.float32)
    got, kept = metrics.relevant_ranks(big, [0, 0, 1, 1])
    expected, kept_ref = _previous_relevant_ranks(big, np.array([0, 0, 1, 1]))
    assert kept.tolist() == kept_ref.tolist() and [g.tolist() for g in got] == [e.tolist() for e in expected]


def test_a_query_without_relevant_items_gets_no_candidate_even_at_minus_infinity():
    # the kernel on its own (the public functions refuse such rows): the l2 product of the two
    # 1.5e19 rows overflows to -inf, and the lone query of class 1 must not count it anywhere
    x = np.array([[0.0], [1.5e19], [1.5e19]], dtype=np.float32)
    y = np.array([0, 0, 1])
    res = ranking.rank_relevant(x, y, None, None, "l2", depth="all")
    assert res.query.tolist() == [0, 1] and res.ranks.tolist() == [1, 2]


def _clustered(n, d, classes, seed, spread=1.5):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d))
    y = rng.integers(0, classes, n)
    return (centers[y] + rng.normal(scale=spread, size=(n, d))).astype(np.float32), y


@pytest.mark.parametrize("leave_one_out", [True, False])
def test_agrees_with_pytorch_metric_learning(leave_one_out):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    x, y = _clustered(1500, 16, 25, seed=3)
    calc = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                              k="max_bin_count")
    if leave_one_out:
        ours = metrics.evaluate_retrieval(x, y)
        pml = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(y))
    else:
        q, yq, r, yr = x[:500], y[:500], x[500:], y[500:]
        ours = metrics.evaluate_retrieval(q, yq, r, yr)
        pml = calc.get_accuracy(torch.from_numpy(q), torch.from_numpy(yq), torch.from_numpy(r), torch.from_numpy(yr),
                                ref_includes_query=False)
    assert abs(ours["precision@1"] - pml["precision_at_1"]) < 1e-6
    assert abs(ours["r_precision"] - pml["r_precision"]) < 1e-6
    assert abs(ours["map@r"] - pml["mean_average_precision_at_r"]) < 1e-6
    assert 0.05 < ours["map@r"] < 0.9  # not a degenerate case


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_tiles_and_chunks_do_not_change_results(monkeypatch, distance):
    x, y = _clustered(400, 8, 7, seed=5)
    full = metrics.evaluate_retrieval(x, y, distance=distance)
    split = metrics.evaluate_retrieval(x[:150], y[:150], x[150:], y[150:], distance=distance)
    monkeypatch.setattr(ranking, "_TILE", 37)  # tiles that cut classes and leave ragged edges
    assert metrics.evaluate_retrieval(x, y, distance=distance) == full
    monkeypatch.setattr(ranking, "_STATE_BYTES", 16 * 900)  # queries in chunks: no symmetric tiles
    assert metrics.evaluate_retrieval(x, y, distance=distance) == full
    assert metrics.evaluate_retrieval(x[:150], y[:150], x[150:], y[150:], distance=distance) == split


def _previous_relevant_ranks(query, query_labels, reference=None, reference_labels=None, distance="l2"):
    """The implementation this module had before the tiled one (sorted relevant distances per
    class, every gallery item bucketed with searchsorted): the reference the new one must equal."""
    q = np.ascontiguousarray(query, dtype=np.float32)
    y_q = np.asarray(query_labels)
    loo = reference is None
    r, y_r = (q, y_q) if loo else (np.ascontiguousarray(reference, dtype=np.float32), np.asarray(reference_labels))
    qt, rt = torch.from_numpy(q), torch.from_numpy(r)
    if distance == "cosine":
        qt, rt = torch.nn.functional.normalize(qt, dim=1), torch.nn.functional.normalize(rt, dim=1)
    out = {}
    for i in range(len(q)):
        cols = np.flatnonzero(y_r == y_q[i])
        R = len(cols) - (1 if loo else 0)
        if R <= 0:
            continue
        d = qt[i : i + 1] @ rt.T
        if distance == "cosine":
            d = -d
        else:
            d = squared_l2_(d, sq_norms(qt[i : i + 1]), sq_norms(rt))
        d = d[0]
        if loo:
            d[i] = float("inf")
        rel_sorted, rel_order = torch.sort(d[torch.from_numpy(cols)], stable=True)
        rel_sorted, rel_order = rel_sorted[:R], rel_order[:R]
        is_rel = torch.zeros(len(r), dtype=torch.bool)
        is_rel[torch.from_numpy(cols)] = True
        if loo:
            is_rel[i] = True
        before = torch.searchsorted(rel_sorted, d[~is_rel])  # relevant items strictly closer
        nonrel_idx = torch.nonzero(~is_rel).flatten()
        ranks = np.arange(1, R + 1)
        for x, b in zip(nonrel_idx.tolist(), before.tolist()):
            # a non-relevant item precedes relevant items b.. (and tied ones of higher index)
            tied = [k for k in range(b, R) if rel_sorted[k] == d[x] and cols[rel_order[k]] < x]
            ranks[b + len(tied):] += 1
        out[i] = ranks
    kept = np.array(sorted(out), dtype=np.int64)
    return [out[i] for i in kept], kept


def _tie_heavy(n, seed, distance):
    rng = np.random.default_rng(seed)
    if distance == "cosine":  # rows whose norm is a power of two: normalising them is exact
        pool = np.array([[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 2, 0], [1, 1, 1, 1], [-1, 1, -1, 1], [1, -1, -1, -1],
                         [0, 0, 0, -4], [2, 0, 0, 0]], dtype=np.float32)
        x = pool[rng.integers(0, len(pool), n)]
    else:
        x = rng.integers(-3, 4, size=(n, 3)).astype(np.float32)
    return x, rng.integers(0, 5, n)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("tile", [1024, 16, 7])  # 16: full tiles a power of two wide
def test_equals_the_previous_implementation_with_ties(monkeypatch, distance, tile):
    monkeypatch.setattr(ranking, "_TILE", tile)
    for seed in range(2):
        x, y = _tie_heavy(60, seed, distance)
        for args in ((x, y), (x[:20], y[:20], x[20:], y[20:])):
            expected, kept = _previous_relevant_ranks(*args, distance=distance)
            got, got_kept = metrics.relevant_ranks(*args, distance=distance)
            assert got_kept.tolist() == kept.tolist()
            assert [g.tolist() for g in got] == [e.tolist() for e in expected]
            full = metrics.evaluate_retrieval(*args, distance=distance)
            fast = metrics.evaluate_retrieval(*args, distance=distance, metrics=("recall", "precision@1", "mrr"))
            first = np.array([e[0] for e in expected], dtype=np.float64)
            assert fast["mrr"] == full["mrr"] == pytest.approx(np.mean(1 / first), abs=1e-12)
            assert fast["precision@1"] == full["precision@1"] == np.mean(first == 1)
            for k in (1, 2, 4, 8):
                assert fast[f"recall@{k}"] == full[f"recall@{k}"] == np.mean(first <= k)
            ap = np.mean([np.mean(np.arange(1, len(e) + 1) / e) for e in expected])
            assert full["map"] == pytest.approx(ap, abs=1e-12)
            shared = metrics.evaluate_retrieval(*args, distance=distance, metrics=("precision@1", "r_precision", "map@r"))
            map_r = np.mean([np.sum((np.arange(1, len(e) + 1) / e)[e <= len(e)]) / len(e) for e in expected])
            r_prec = np.mean([np.mean(e <= len(e)) for e in expected])
            assert shared["map@r"] == full["map@r"] == pytest.approx(map_r, abs=1e-12)
            assert shared["r_precision"] == full["r_precision"] == pytest.approx(r_prec, abs=1e-12)


def test_duplicate_vectors_in_other_classes_tie_by_index():
    # continuous values, exact copies of some rows under other labels, classes small and large:
    # every product (per class, per tile, ragged edges) must give equal vectors equal distances
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 16)).astype(np.float32)
    x[60:90] = x[:30]
    y = np.r_[rng.integers(0, 4, 60), rng.integers(4, 40, 60)]
    expected, kept = _previous_relevant_ranks(x, y)
    got, got_kept = metrics.relevant_ranks(x, y)
    assert got_kept.tolist() == kept.tolist()
    assert [g.tolist() for g in got] == [e.tolist() for e in expected]


def test_metrics_argument_selects_and_is_checked():
    x, y = _clustered(300, 8, 6, seed=2)
    full = metrics.evaluate_retrieval(x, y, ks=(1, 5))
    some = metrics.evaluate_retrieval(x, y, ks=(1, 5), metrics=["map@r", "recall"])
    assert set(some) == {"recall@1", "recall@5", "map@r", "num_queries", "num_excluded"}
    assert all(some[k] == full[k] for k in some)
    per = metrics.per_query_metrics(x, y, metrics=("precision@1",))
    assert set(per) == {"query", "precision@1"} and per["precision@1"].mean() == full["precision@1"]
    with pytest.raises(ValueError, match="'metrics'.*'map@R'"):
        metrics.evaluate_retrieval(x, y, metrics=("map@R",))


def test_positive_ranks_and_recall_at_k():
    feats = col(0, 2, 1, 3, -1.5, -2)  # query 0, positive 1 (distance 2), negatives at 1, 3, 1.5, 2 (tie)
    sets = [data.ComparativeSet(0, 1, np.array([2, 3, 4, 5]))]
    ranks = metrics.positive_ranks(feats, sets)
    assert ranks.tolist() == [3]  # two negatives strictly closer; the tie does not count
    assert metrics.recall_at_k([1, 3, 5, 2], 2) == 0.5
    with pytest.raises(ValueError, match="'ranks'"):
        metrics.recall_at_k([], 1)


@pytest.mark.parametrize("leave_one_out", [True, False])
def test_evaluate_distances_matches_evaluate_retrieval(leave_one_out):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(60, 6)).astype(np.float32)
    y = rng.integers(0, 5, 60)
    if leave_one_out:
        expected = metrics.evaluate_retrieval(x, y)
        got = metrics.evaluate_distances(metrics.pairwise_distances(x, x), y)
    else:
        expected = metrics.evaluate_retrieval(x[:20], y[:20], x[20:], y[20:])
        got = metrics.evaluate_distances(metrics.pairwise_distances(x[:20], x[20:]), y[:20], y[20:])
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k] == pytest.approx(expected[k], abs=1e-9), k


def test_evaluate_distances_by_hand_and_errors():
    # 3 queries, leave-one-out; labels a a b; row 0: 1 (a) at 0.5, 2 (b) at 0.2 -> rank of the positive is 2
    d = np.array([[0.0, 0.5, 0.2], [0.5, 0.0, 0.1], [0.2, 0.1, 0.0]])
    r = metrics.evaluate_distances(d, ["a", "a", "b"], ks=(1, 2))
    assert r["num_queries"] == 2 and r["num_excluded"] == 1  # b has no other b
    assert r["recall@1"] == 0.0 and r["recall@2"] == 1.0 and r["map@r"] == 0.0 and r["mrr"] == 0.5
    with pytest.raises(ValueError, match="square"):
        metrics.evaluate_distances(d[:2], ["a", "a"])
    with pytest.raises(ValueError, match="NaN"):
        metrics.evaluate_distances(np.full((2, 2), np.nan), ["a", "a"])
    with pytest.raises(ValueError, match="'query_labels'"):
        metrics.evaluate_distances(d, ["a", "a"])


def test_rung_keys_order_as_row_then_distance_negative_and_signed_zero_included():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(scale=4, size=400), [0.0, -0.0, 1e-45, -1e-45, 3e38, -3e38]]).astype(np.float32)
    rows = rng.integers(0, 5, len(values))
    keys = ranking._keys(rows, values)
    order = np.lexsort((values, rows))  # by row, then by distance
    assert (np.diff(keys[order]) >= 0).all()
    same = (rows[:, None] == rows[None, :]) & (values[:, None] == values[None, :])
    assert ((keys[:, None] == keys[None, :]) == same).all()  # equal keys exactly for equal distances (0.0 == -0.0)


def test_keys_give_their_distances_back():
    rng = np.random.default_rng(4)
    values = np.concatenate([rng.normal(scale=4, size=400), [0.0, -0.0, 1e-45, -1e-45, 3e38, -3e38]]).astype(np.float32)
    back = ranking._distances(ranking._keys(rng.integers(0, 9, len(values)), values))
    assert back.dtype == np.float32
    assert (back.view(np.int32) == (values + np.float32(0.0)).view(np.int32)).all()  # bit for bit, -0.0 as 0.0
