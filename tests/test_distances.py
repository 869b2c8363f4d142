"""Exact k nearest neighbours and range search (distances module; index.knn is an alias)."""
import numpy as np
import pytest

from utils_cv.similarity import distances, index



def _brute(q, r, k, distance):
    d = index.pairwise_distances(q, r, distance)
    order = np.lexsort((np.broadcast_to(np.arange(r.shape[0]), d.shape), d), axis=1)[:, :k]
    return np.take_along_axis(d, order, 1), order


BACKENDS = ["torch", "faiss"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_knn_equals_brute_force(distance, backend):
    rng = np.random.default_rng(1)
    q, r = rng.normal(size=(37, 16)), rng.normal(size=(101, 16))
    D, I = index.knn(q, r, 7, distance=distance, backend=backend)
    Db, Ib = _brute(q, r, 7, distance)
    assert D.dtype == np.float32 and I.dtype == np.int64 and D.shape == (37, 7)
    np.testing.assert_array_equal(I, Ib)
    np.testing.assert_allclose(D, Db, atol=1e-5)
    assert (np.diff(D, axis=1) >= 0).all()


def test_knn_l2_is_euclidean():
    q = np.array([[0.0, 0.0]])
    r = np.array([[3.0, 4.0], [1.0, 0.0]])
    D, I = index.knn(q, r, 2)
    np.testing.assert_allclose(D, [[1.0, 5.0]], atol=1e-6)
    assert I.tolist() == [[1, 0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_break_by_lower_index_and_exclude_self(backend):
    x = np.array([[0.0], [1.0], [1.0], [1.0], [2.0]])
    D, I = index.knn(x, x, 2, exclude_self=True, backend=backend)
    assert I.tolist() == [[1, 2], [2, 3], [1, 3], [1, 2], [1, 2]]
    D, I = index.knn(np.array([[1.0]]), x, 3, backend=backend)
    assert I.tolist() == [[1, 2, 3]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_ties_beyond_the_candidate_window(backend):
    # 30 identical points and a far one: the 5 nearest must be the 5 lowest indices
    x = np.vstack([np.ones((30, 4)), np.zeros((1, 4))])[::-1].copy()  # far point first
    D, I = index.knn(x[1:2], x, 5, backend=backend)
    assert I.tolist() == [[1, 2, 3, 4, 5]]
    D, I = index.knn(x, x, 5, exclude_self=True, backend=backend)
    assert I[10].tolist() == [1, 2, 3, 4, 5] and I[1].tolist() == [2, 3, 4, 5, 6]


def test_exact_knn_leave_one_out_matches_brute_force_in_blocks(monkeypatch):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(120, 8))
    monkeypatch.setattr(distances, "_BLOCK_BYTES", 4 * 120 * 7)  # 7 rows per block
    D, I = index.knn(x, x, 4, exclude_self=True, backend="torch")
    d = index.pairwise_distances(x, x)
    np.fill_diagonal(d, np.inf)
    np.testing.assert_array_equal(I, np.argsort(d, axis=1, kind="stable")[:, :4])


def test_knn_rejects_bad_input():
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="'k' parameter .* larger"):
        index.knn(x, x, 3, exclude_self=True)
    with pytest.raises(ValueError, match="'k' parameter must be a positive"):
        index.knn(x, x, 0)
    with pytest.raises(ValueError, match="'distance' parameter"):
        index.knn(x, x, 1, distance="cosin")
    with pytest.raises(ValueError, match="dimension"):
        index.knn(x, np.zeros((3, 4)), 1)
    with pytest.raises(ValueError, match="'backend'"):
        index.knn(x, x, 1, backend="annoy")
    with pytest.raises(ValueError, match="NaN"):
        index.knn(np.array([[np.nan, 0.0]]), x, 1)


# ---------------------------------------------------------------------------- SimilarityIndex


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_pairs_within_equals_a_brute_force_scan(distance):
    rng = np.random.default_rng(3)
    x = distances.l2_normalize(rng.normal(size=(300, 16)).astype(np.float32))
    x[10] = x[20]  # an exact duplicate: distance 0
    radius = 0.9 if distance == "l2" else 0.4
    i, j, d = distances.pairs_within(x, radius, distance=distance, block_rows=37)
    full = distances.pairwise_distances(x, x, distance)
    want = [(a, b) for a in range(len(x)) for b in range(a + 1, len(x)) if full[a, b] <= radius]
    assert list(zip(i.tolist(), j.tolist())) == want and (10, 20) in want
    np.testing.assert_allclose(d, full[i, j], atol=1e-5)
    with pytest.raises(ValueError, match="'radius'"):
        distances.pairs_within(x, -1.0)
