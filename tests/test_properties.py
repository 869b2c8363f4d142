"""Property-based tests: metrics and knn on random small inputs (ties included) against slow
references written straight from the definitions (METRICS.md)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from utils_cv.similarity import index, metrics, ranking

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def labelled_points(draw, min_n=2, max_n=14):
    n = draw(st.integers(min_n, max_n))
    d = draw(st.integers(1, 4))
    x = draw(arrays(np.int8, (n, d), elements=st.integers(-3, 3))).astype(np.float32)  # small ints: many ties
    y = np.array(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)))
    return x, y


def _ranking(x, i, exclude):
    d = ((x.astype(np.float64) - x[i]) ** 2).sum(1)
    order = [j for j in sorted(range(len(x)), key=lambda j: (d[j], j)) if not (exclude and j == i)]
    return order


def _reference_metrics(x, y, ks):
    rows = []
    for i in range(len(x)):
        order = _ranking(x, i, exclude=True)
        rel = [y[j] == y[i] for j in order]
        R = sum(rel)
        if R == 0:
            continue
        first = rel.index(True) + 1
        hits = np.cumsum(rel)
        prec_at_rel = [hits[p] / (p + 1) for p in range(len(rel)) if rel[p]]
        rows.append({
            **{f"recall@{k}": float(first <= k) for k in ks},
            "precision@1": float(rel[0]),
            "r_precision": sum(rel[:R]) / R,
            "map@r": sum(hits[p] / (p + 1) for p in range(R) if rel[p]) / R,
            "map": float(np.mean(prec_at_rel)),
            "mrr": 1.0 / first,
        })
    return rows


@SETTINGS
@given(labelled_points())
def test_evaluate_retrieval_matches_the_definitions(data):
    x, y = data
    ks = (1, 2, 4)
    ref = _reference_metrics(x, y, ks)
    if not ref:
        with pytest.raises(ValueError, match="No query"):
            metrics.evaluate_retrieval(x, y, ks=ks)
        return
    got = metrics.evaluate_retrieval(x, y, ks=ks)
    assert got["num_queries"] == len(ref) and got["num_excluded"] == len(x) - len(ref)
    for key in ref[0]:
        assert got[key] == pytest.approx(np.mean([r[key] for r in ref]), abs=1e-9), key


@SETTINGS
@given(labelled_points(), st.integers(1, 6), st.sampled_from([None, ("recall", "precision@1", "mrr"),
                                                              ("precision@1", "r_precision", "map@r")]))
def test_any_tiling_and_any_metric_subset_match_the_definitions(data, tile, subset):
    x, y = data
    ks = (1, 2, 4)
    ref = _reference_metrics(x, y, ks)
    if not ref:
        return
    saved = ranking._TILE
    ranking._TILE = tile  # tiles smaller than classes, ragged edges, symmetric halves
    try:
        got = metrics.evaluate_retrieval(x, y, ks=ks, metrics=subset)
    finally:
        ranking._TILE = saved
    expected_keys = {k for k in ref[0] if subset is None or k in subset or (k.startswith("recall@") and "recall" in subset)}
    assert set(got) == expected_keys | {"num_queries", "num_excluded"}
    for key in expected_keys:
        assert got[key] == pytest.approx(np.mean([r[key] for r in ref]), abs=1e-9), key


@SETTINGS
@given(labelled_points(min_n=3), st.sampled_from(["faiss", "torch"]))
def test_knn_matches_a_sorted_scan_ties_by_lower_index(data, backend):
    x, _ = data
    k = len(x) - 1
    D, I = index.knn(x, x, k, exclude_self=True, backend=backend)
    for i in range(len(x)):
        order = _ranking(x, i, exclude=True)[:k]
        assert I[i].tolist() == order
        expected = np.sqrt(((x[order].astype(np.float64) - x[i]) ** 2).sum(1))
        np.testing.assert_allclose(D[i], expected, atol=1e-5)


@SETTINGS
@given(labelled_points(min_n=4))
def test_evaluate_distances_agrees_with_evaluate_retrieval(data):
    x, y = data
    if not _reference_metrics(x, y, (1,)):
        return
    a = metrics.evaluate_retrieval(x, y)
    b = metrics.evaluate_distances(metrics.pairwise_distances(x, x), y)
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-9), key
