"""Bad numbers and shapes at every public entry point: a ValueError that names the parameter."""
import numpy as np
import pytest

from utils_cv.similarity import data, index, index_tuning, metrics, rerank
from utils_cv.similarity.index import SimilarityIndex

rng = np.random.default_rng(0)
X = rng.normal(size=(20, 4)).astype(np.float32)
Y = np.repeat(["a", "b", "c", "d"], 5)
NAN = X.copy()
NAN[3, 1] = np.nan
INF = X.copy()
INF[0, 0] = np.inf
HUGE = X.copy()
HUGE[2] = 1e19  # finite, but a float32 distance to this row overflows

CASES = [
    # (call, expected words in the message)
    (lambda: index.knn(NAN, X, 3), "'query'.*NaN"),
    (lambda: index.knn(X, INF, 3), "'reference'.*infinite"),
    (lambda: index.knn(X.astype(np.int32), X, 3), "'query'.*floats"),
    (lambda: index.knn(X[0], X, 3), "'query'.*2-D"),
    (lambda: index.knn(X, X[:, :3], 3), "dimension"),
    (lambda: index.knn(X, X, 0), "'k'"),
    (lambda: index.knn(X, X, -2), "'k'"),
    (lambda: index.knn(X, X, 2.5), "'k'"),
    (lambda: index.knn(X, X, 30), "'k'"),
    (lambda: index.knn(X[:0], X, 3), "'query'.*empty"),
    (lambda: index.knn(X, X, 3, distance="manhattan"), "'distance'"),
    (lambda: index.pairwise_distances(NAN, X), "'query'.*NaN"),
    (lambda: SimilarityIndex.build(NAN, range(20)), "'features'.*NaN"),
    (lambda: SimilarityIndex.build(X, range(19)), "'ids'"),
    (lambda: SimilarityIndex.build(X, range(20)).search(X, 0), "'k'"),
    (lambda: SimilarityIndex.build(X, range(20)).search(X[:, :2], 1), "dimension"),
    (lambda: SimilarityIndex.build(X, range(20)).search(INF, 1), "'query'.*infinite"),
    (lambda: SimilarityIndex.build(X, range(20)).search(X[:0], 1), "'query'.*empty"),
    (lambda: metrics.evaluate_retrieval(NAN, Y), "'query'.*NaN"),
    (lambda: metrics.evaluate_retrieval(X, Y[:-1]), "'query_labels'"),
    (lambda: metrics.evaluate_retrieval(X, Y, X[:5], Y[:4]), "'reference_labels'"),
    (lambda: metrics.evaluate_retrieval(X[:0], Y[:0]), "'query'.*empty"),
    (lambda: metrics.evaluate_retrieval(X, Y, ks=(0, 1)), "'ks'"),
    (lambda: metrics.evaluate_distances(np.zeros((3, 3)), ["a"] * 2), "'query_labels'"),
    (lambda: metrics.recall_at_k(np.array([1, 2]), 0), "'k'"),
    (lambda: metrics.recall_at_k(np.array([]), 1), "'ranks'.*empty"),
    (lambda: metrics.positive_ranks(NAN, data.comparative_sets(Y, num_negatives=3)), "'features'.*NaN"),
    (lambda: data.comparative_sets(Y, num_negatives=0), "'num_negatives'"),
    (lambda: data.comparative_sets(Y, num_negatives=16), "num_negatives"),
    (lambda: data.split_by_image(list(range(20)), Y, test_size=1.5), "'test_size'"),
    (lambda: data.split_by_image(list(range(20)), Y[:-1]), "'labels'"),
    (lambda: data.split_by_class(list(range(20)), Y, test_classes=0.0), "'test_classes'"),
    (lambda: rerank.k_reciprocal_rerank(NAN, X, k1=3, k2=2), "'query'.*NaN"),
    (lambda: rerank.k_reciprocal_rerank(X[:0], X, k1=3, k2=2), "'query'"),
    (lambda: index_tuning.clustered_vectors(-1, 4), "'n'"),
    (lambda: SimilarityIndex.build(np.zeros((3, 0), np.float32), range(3)), "'features'.*0 columns"),
    (lambda: index.knn(X, HUGE, 3), "'reference'.*overflow"),
    (lambda: index.pairwise_distances(HUGE, X), "'query'.*overflow"),
    (lambda: SimilarityIndex.build(HUGE, range(20)), "'features'.*overflow"),
    (lambda: metrics.evaluate_retrieval(HUGE, Y), "'query'.*overflow"),
    (lambda: rerank.k_reciprocal_rerank(X, HUGE, k1=3, k2=2), "overflow"),
]


@pytest.mark.parametrize("call,match", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_bad_numeric_input_names_the_parameter(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_numpy_scalars_are_numbers_and_zero_width_features_are_refused():
    from utils_cv.similarity import distances, rerank

    x = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    d = rerank.k_reciprocal_rerank(x, k1=5, k2=2, lambda_value=np.float32(0.3))
    assert d.shape == (30, 30)
    np.testing.assert_allclose(d, rerank.k_reciprocal_rerank(x, k1=5, k2=2, lambda_value=0.3), atol=1e-6)
    with pytest.raises(ValueError, match="'query'.*0 columns"):
        distances.knn(np.zeros((3, 0), np.float32), np.zeros((3, 0), np.float32), 1)
