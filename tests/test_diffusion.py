import numpy as np
import pytest

from utils_cv.similarity import diffusion, metrics
from utils_cv.similarity.diffusion import DiffusionGraph, default_k, diffusion_distances


def _direct(x, q, k, kq, alpha, gamma, same):
    """Dense, step by step: the paper's definition with full matrices and a matrix inverse."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    n = len(x)
    cos = x @ x.T
    w = np.zeros((n, n))
    for i in range(n):
        order = [j for j in np.lexsort((np.arange(n), -cos[i])) if j != i][:k]
        w[i, order] = np.clip(cos[i, order], 0, None) ** gamma
    w = np.minimum(w, w.T)
    deg = w.sum(1)
    deg[deg == 0] = 1
    s = w / np.sqrt(np.outer(deg, deg))
    inv = np.linalg.inv(np.eye(n) - alpha * s)
    cq = q @ x.T
    y = np.zeros((len(q), n))
    for a in range(len(q)):
        order = [j for j in np.lexsort((np.arange(n), -cq[a])) if not (same and j == a)][:kq]
        y[a, order] = np.clip(cq[a, order], 0, None) ** gamma
    return (y @ inv.T) / np.sqrt(deg)[None, :]


def _arcs(n_per=40, seed=0, dim=16):
    """Two classes on interleaved half-circles (the two-moons shape) in a random 2-D plane of a
    higher-dimensional space, shifted off the origin: close ends of one arc are nearer to the
    other arc than to their own far end, so straight distances mix the classes."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, np.pi, n_per)
    a = np.stack([np.cos(t), np.sin(t)], 1)
    b = np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1)
    pts = np.concatenate([a, b]) + rng.normal(0, 0.04, (2 * n_per, 2))
    basis = np.linalg.qr(rng.normal(size=(dim, 3)))[0].T
    x = pts @ basis[:2] + 4.0 * basis[2]
    return x.astype(np.float32), ["a"] * n_per + ["b"] * n_per


@pytest.mark.parametrize("same, shift", [(True, 1.0), (False, 1.0), (True, 0.0)])  # 0: half the cosines < 0
def test_scores_equal_the_definition(same, shift):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 8)).astype(np.float32) + shift
    q = None if same else rng.normal(size=(7, 8)).astype(np.float32) + shift
    got = DiffusionGraph(x, k=6, alpha=0.9, gamma=2.0).scores(q, kq=4)
    want = _direct(x, x if same else q, 6, 4, 0.9, 2.0, same)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def _two_worlds(seed=3):
    """Two clusters on orthogonal axes: two components of the graph, which no walk crosses."""
    rng = np.random.default_rng(seed)
    a, b = np.eye(6, dtype=np.float32)[:2]
    return np.concatenate([a + rng.normal(0, 0.05, (30, 6)), b + rng.normal(0, 0.05, (30, 6))]).astype(np.float32)


@pytest.mark.parametrize("worlds", [False, True])
def test_conjugate_gradient_agrees_with_the_direct_solve(monkeypatch, worlds):
    x = _two_worlds() if worlds else _arcs(n_per=50)[0]
    queries = x[::7] + 0.01
    direct = DiffusionGraph(x, k=8)
    want_loo, want_q = direct.scores(), direct.scores(queries)
    monkeypatch.setattr(diffusion, "_DENSE_MAX", 10)  # the path of galleries above 4,096 images
    monkeypatch.setattr(diffusion, "_BLOCK_BYTES", 8 * len(x) * 16)  # blocks of 16 queries
    iterative = DiffusionGraph(x, k=8)
    for got, want in ((iterative.scores(tol=1e-8), want_loo), (iterative.scores(queries, tol=1e-8), want_q)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7 * want.max())
    if worlds:  # nothing crosses between components, by either path
        assert (want_loo[:30, 30:] == 0).all() and (iterative.scores()[:30, 30:] == 0).all()


def test_conjugate_gradient_warns_when_it_stops_early(monkeypatch, caplog):
    x, _ = _arcs(n_per=30)
    monkeypatch.setattr(diffusion, "_DENSE_MAX", 10)
    with caplog.at_level("WARNING", logger="utils_cv.similarity.diffusion"):
        DiffusionGraph(x).scores(max_iter=1)
    assert "had not converged after max_iter=1" in caplog.text


def test_diffusion_follows_the_manifold_where_straight_distances_do_not():
    x, labels = _arcs()
    plain = metrics.evaluate_retrieval(x, labels)["map@r"]
    diffused = metrics.evaluate_distances(diffusion_distances(x, k=5), labels)["map@r"]
    assert plain < 0.8
    assert diffused > plain + 0.1


def test_unreached_images_follow_the_reached_ones_by_cosine_distance():
    rng = np.random.default_rng(2)
    centre = np.zeros(6, np.float32)
    centre[0] = 1
    far = np.zeros(6, np.float32)
    far[1] = 1
    x = np.concatenate([centre + rng.normal(0, 0.05, (10, 6)), far + rng.normal(0, 0.05, (10, 6))]).astype(np.float32)
    q = (centre + rng.normal(0, 0.05, (1, 6))).astype(np.float32)
    d = diffusion_distances(q, x, k=9, kq=3)[0]  # each cluster: its own 9 mutual neighbours
    assert (d[:10] >= 0.5).all() and (d[:10] < 1).all() and (d[10:] >= 1).all()  # the far cluster: another component
    cos = 1 - (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (q[0] / np.linalg.norm(q[0]))
    assert np.array_equal(np.argsort(d[10:]), np.argsort(cos[10:]))
    assert d.min() == 0.5 and d.max() <= 2.0


def test_leave_one_out_puts_each_image_first_for_itself_and_keeps_the_input():
    x, labels = _arcs(n_per=20)
    before = x.copy()
    d = diffusion_distances(x)
    assert d.shape == (40, 40) and d.dtype == np.float32
    assert np.all(np.diag(d) == 0) and (d[~np.eye(40, dtype=bool)] >= 0.5).all()
    assert (np.argsort(d, axis=1, kind="stable")[:, 0] == np.arange(40)).all()
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(d, diffusion_distances(x))  # deterministic


def test_default_k_grows_with_the_collection_within_bounds():
    assert [default_k(n) for n in (3, 10, 92, 374, 2262, 100_000)] == [2, 5, 10, 19, 48, 50]
    x, _ = _arcs(n_per=2)  # 4 images: k and kq both shrink to the 3 others
    assert diffusion_distances(x).shape == (4, 4)
    assert diffusion_distances(x[:1], x[1:]).shape == (1, 3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=40), "'k' parameter \\(40\\) must be at most n - 1 = 39"),
    (dict(k=0), "'k' parameter must be a positive integer"),
    (dict(k=True), "'k' parameter must be a positive integer"),
    (dict(alpha=1.0), "'alpha' parameter must be a number in \\(0, 1\\)"),
    (dict(alpha=0), "'alpha' parameter must be a number in \\(0, 1\\)"),
    (dict(gamma=0), "'gamma' parameter must be a number in \\(0, inf\\)"),
    (dict(kq=40), "'kq' parameter \\(40\\) must be at most 39"),
])
def test_bad_parameters_name_themselves(kwargs, match):
    x, _ = _arcs(n_per=20)
    with pytest.raises(ValueError, match=match):
        diffusion_distances(x, **kwargs)


def test_bad_features_are_refused_with_their_name():
    x, _ = _arcs(n_per=10)
    with pytest.raises(ValueError, match="'query' has dimension 3 but 'gallery' has 16"):
        diffusion_distances(np.ones((2, 3), np.float32), x)
    with pytest.raises(ValueError, match="'query' parameter must hold at least 2 images"):
        diffusion_distances(x[:1])
    with pytest.raises(ValueError, match="'query' parameter contains NaN"):
        diffusion_distances(np.full((5, 16), np.nan, np.float32))
    graph = DiffusionGraph(x)
    with pytest.raises(ValueError, match="'tol' parameter must be a number in \\(0, 1\\)"):
        graph.scores(tol=-1)
    with pytest.raises(ValueError, match="'max_iter' parameter must be a positive integer"):
        graph.scores(max_iter=0)
    with pytest.raises(ValueError, match="'gallery' parameter contains NaN"):
        diffusion_distances(x[:2], np.full((5, 16), np.nan, np.float32))
