import numpy as np
import pytest

from utils_cv.similarity import index, index_tuning
from utils_cv.similarity.rerank import k_reciprocal_rerank


def _direct(q, g, k1, k2, lam):
    """Dense, unblocked: the authors' reference algorithm, step by step on full matrices."""
    same = g is None
    x = (q if same else np.concatenate([q, g])).astype(np.float64)
    n, nq = len(x), len(q)
    gal = np.arange(n) if same else np.arange(nq, n)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    d = d / d.max(1, keepdims=True)
    # nearest first, itself at rank 0, ties by lower index
    order = np.stack([np.concatenate([[i], [j for j in np.lexsort((np.arange(n), d[i])) if j != i]]) for i in range(n)])
    V = np.zeros((n, n))
    for i in range(n):
        fwd = order[i, :k1 + 1]
        r = np.array([c for c in fwd if i in order[c, :k1 + 1]])
        exp = list(r)
        h = int(np.around(k1 / 2))
        for c in r:
            rc = np.array([e for e in order[c, :h + 1] if c in order[e, :h + 1]])
            if len(set(rc) & set(r)) > 2 / 3 * len(rc):
                exp += list(rc)
        exp = np.unique(exp)
        w = np.exp(-d[i, exp])
        V[i, exp] = w / w.sum()
    if k2 > 1:
        V = np.stack([V[order[i, :k2]].mean(0) for i in range(n)])
    out = np.empty((nq, len(gal)))
    for a in range(nq):
        for b, j in enumerate(gal):
            mn, mx = np.minimum(V[a], V[j]).sum(), np.maximum(V[a], V[j]).sum()
            out[a, b] = (1 - lam) * (1 - mn / mx) + lam * d[a, j]
    return out


@pytest.mark.parametrize("k1,k2,lam", [(20, 6, 0.3), (5, 1, 0.0), (8, 3, 0.7)])
def test_matches_the_direct_dense_computation(k1, k2, lam):
    x = index_tuning.clustered_vectors(90, 8, clusters=6, noise=0.4, seed=1)
    q, g = x[:25], x[25:]
    np.testing.assert_allclose(k_reciprocal_rerank(q, g, k1, k2, lam), _direct(q, g, k1, k2, lam), atol=2e-5)


def test_blocks_give_the_same_answer(monkeypatch):
    from utils_cv.similarity import rerank

    x = index_tuning.clustered_vectors(120, 16, clusters=5, seed=2)
    full = k_reciprocal_rerank(x[:30], x[30:], k1=10)
    monkeypatch.setattr(rerank, "_BLOCK_BYTES", 4 * 120 * 3)  # three rows per block
    np.testing.assert_array_equal(k_reciprocal_rerank(x[:30], x[30:], k1=10), full)


def test_lambda_one_is_the_original_ranking():
    x = index_tuning.clustered_vectors(60, 8, clusters=4, seed=3)
    q, g = x[:10], x[10:]
    D, I = index.knn(q, g, len(g))
    rr = k_reciprocal_rerank(q, g, k1=6, k2=1, lambda_value=1.0)
    assert (np.argsort(rr, axis=1, kind="stable") == I).all()


def test_reranking_fixes_a_ranking_that_plain_distance_gets_wrong():
    """The nearest gallery image b1 belongs to a tight group B whose members are each other's
    nearest neighbours: the query is not among b1's 4 nearest, so b1 is not a k-reciprocal
    neighbour. The query's own group A is loose: each a_i has the query among its 4 nearest,
    and the query has every a_i among its 4 nearest, so they are k-reciprocal and re-ranking
    (k1 = 4) puts all of A before b1."""
    angles = np.deg2rad([130, 180, 230])
    a = 0.95 * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # 0.95 from the query, 0.80 apart
    b = np.array([[0.9, 0.0], [1.1, 0.0], [1.0, 0.1], [1.0, -0.1], [1.1, 0.1]])  # b1 0.9 from the query
    query = np.zeros((1, 2), np.float32)
    gallery = np.concatenate([a, b]).astype(np.float32)
    labels = np.array(["A"] * 3 + ["B"] * 5)
    plain = index.knn(query, gallery, 4)[1][0]
    assert labels[plain].tolist() == ["B", "A", "A", "A"], "plain distance ranks b1 first"
    rr = k_reciprocal_rerank(query, gallery, k1=4, k2=1, lambda_value=0.3)
    assert labels[np.argsort(rr[0])[:4]].tolist() == ["A", "A", "A", "B"], "re-ranking puts A first"
    assert rr[0, 3] > rr[0, :3].max()


def test_bad_arguments():
    x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="'k1'"):
        k_reciprocal_rerank(x[:5], x[5:], k1=0)
    with pytest.raises(ValueError, match="'k1'"):
        k_reciprocal_rerank(x[:5], x[5:], k1=40)
    with pytest.raises(ValueError, match="'k2'"):
        k_reciprocal_rerank(x[:5], x[5:], k1=4, k2=9)
    with pytest.raises(ValueError, match="'lambda_value'"):
        k_reciprocal_rerank(x[:5], x[5:], k1=4, k2=2, lambda_value=1.5)
    with pytest.raises(ValueError, match="dimension"):
        k_reciprocal_rerank(x[:5, :3], x[5:], k1=4, k2=2)
    with pytest.raises(ValueError, match="NaN"):
        k_reciprocal_rerank(np.full((2, 4), np.nan), x, k1=4, k2=2)


def test_leave_one_out_mode_is_the_query_set_against_itself():
    x = index_tuning.clustered_vectors(70, 8, clusters=5, noise=0.4, seed=4)
    rr = k_reciprocal_rerank(x, k1=8, k2=3)
    assert rr.shape == (70, 70)
    np.testing.assert_allclose(np.diag(rr), 0.0, atol=1e-6)  # itself: Jaccard 0, distance 0
    np.testing.assert_allclose(rr, _direct(x, None, 8, 3, 0.3), atol=2e-5)


def test_choose_parameters_keeps_the_best_of_a_grid_that_the_rerank_reproduces():
    from utils_cv.similarity import metrics, rerank

    rng = np.random.default_rng(2)
    y = np.arange(60) % 4
    x = (rng.normal(size=(4, 8))[y] + 0.9 * rng.normal(size=(60, 8))).astype(np.float32)
    labels = [str(v) for v in y]
    choice = rerank.choose_parameters(x, labels, k1s=(4, 8, 200), k2s=(1, 3), lambdas=(0.3, 1.0))
    # k1 200 is lowered to what 60 images allow, 59
    assert sorted(choice.scores) == [(k1, k2, lam) for k1 in (4, 8, 59) for k2 in (1, 3) for lam in (0.3, 1.0)]
    best = max(choice.scores.values())
    assert choice.scores[tuple(choice.params.values())] == best
    # every score is the MAP@R of k_reciprocal_rerank with those parameters; lambda 1: no re-ranking
    for (k1, k2, lam), score in choice.scores.items():
        d = rerank.k_reciprocal_rerank(x, k1=k1, k2=k2, lambda_value=lam)
        assert metrics.evaluate_distances(d, labels)["map@r"] == pytest.approx(score, abs=1e-12)
    plain = metrics.evaluate_retrieval(x, labels)["map@r"]
    assert choice.scores[(4, 1, 1.0)] == pytest.approx(plain, abs=1e-9)
    assert best > plain  # the data are drawn so that re-ranking helps: the choice is not lambda 1
    with pytest.raises(ValueError, match=r"is at most k1 \+ 1"):
        rerank.choose_parameters(x, labels, k1s=(2,), k2s=(6,))
    with pytest.raises(ValueError, match="two images"):
        rerank.choose_parameters(x[:4], ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match=r"one label per row \(60\); got 3"):
        rerank.choose_parameters(x, labels[:3])


def test_choose_parameters_prefers_the_original_ranking_on_ties():
    from utils_cv.similarity import rerank

    x = np.eye(6, dtype=np.float32)[[0, 0, 1, 1, 2, 2]] + np.arange(6)[:, None] * 1e-3
    choice = rerank.choose_parameters(x, list("aabbcc"), k1s=(3, 2), k2s=(2, 1), lambdas=(0.5, 1.0))
    assert set(choice.scores.values()) == {1.0}  # every pair is each other's nearest: all perfect
    assert choice.params == {"k1": 2, "k2": 1, "lambda_value": 1.0}
    # bad grids are named
    for bad, match in ((dict(lambdas=()), "'lambdas' parameter is empty"), (dict(k1s=(0,)), "k1s"),
                       (dict(lambdas=(1.5,)), "lambda_value"), (dict(lambdas=(True,)), "lambda_value")):
        with pytest.raises(ValueError, match=match):
            rerank.choose_parameters(x, list("aabbcc"), **bad)
    with pytest.raises(ValueError, match="missing"):
        rerank.choose_parameters(x, ["a", "a", None, "b", "c", "c"])
