"""index_tuning: recommend a backend, sweep search parameters, clustered test vectors."""
import numpy as np
import pytest

from utils_cv.similarity import index_tuning
from utils_cv.similarity.distances import knn
from utils_cv.similarity.index import SimilarityIndex


@pytest.fixture(scope="module")
def data():
    x = index_tuning.clustered_vectors(6000, 32, clusters=50, noise=0.3, seed=0)
    return x, None, None


def test_recommend_measures_every_candidate_and_picks_a_fast_one_that_reaches_the_target(data):
    x, _, _ = data
    rec = index_tuning.recommend(x, target_recall=0.9, num_queries=200)
    names = [r["backend"] for r in rec["table"]]
    assert names[0] == "exact" and {"hnsw", "ivfsq", "ivfpq"} <= set(names)
    exact = rec["table"][0]
    assert exact["recall@10"] == 1.0
    chosen = next(r for r in rec["table"] if r["backend"] == rec["backend"] and r["params"] == rec["params"])
    assert chosen["recall@10"] >= 0.9
    assert chosen["qps"] == max(r["qps"] for r in rec["table"] if r["recall@10"] >= 0.9)
    only_exact = index_tuning.recommend(x[:500], target_recall=1.0, candidates=[("exact", {})], num_queries=50)
    assert only_exact["backend"] == "exact"



def test_clustered_vectors_and_the_recall_speed_sweep():
    x = index_tuning.clustered_vectors(3000, 16, clusters=20, noise=0.1, seed=3)
    again = index_tuning.clustered_vectors(3000, 16, clusters=20, noise=0.1, seed=3)
    q = index_tuning.clustered_vectors(100, 16, clusters=20, noise=0.1, seed=3, draw=1)
    assert x.shape == (3000, 16) and x.dtype == np.float32 and (x == again).all()
    assert not np.isin(q, x).all(axis=1).any(), "draw=1 is a new sample"
    # 20 blobs of std 0.1 around centres ~sqrt(2 * 16) apart: each query's neighbour is in its own blob
    _, I = knn(q, x, 1)
    assert (np.linalg.norm(q - x[I[:, 0]], axis=1) < 1.0).all()
    ids = list(range(len(x)))
    exact = SimilarityIndex.build(x, ids)
    hnsw = SimilarityIndex.build(x, ids, backend="hnsw", M=4, efConstruction=8)
    rows = index_tuning.sweep_search_params(hnsw, q, [{"efSearch": 1}, {"efSearch": 400}], exact=exact)
    assert [r["params"]["efSearch"] for r in rows] == [1, 400] and hnsw.params["efSearch"] == 400
    assert rows[1]["recall@10"] >= rows[0]["recall@10"] and rows[1]["recall@10"] >= 0.9
    assert all(r["qps"] > 0 and r["backend"] == "hnsw" for r in rows)
    truth = exact.search(q, 10)[1]
    assert index_tuning.sweep_search_params(exact, q, [{}], truth=truth)[0]["recall@10"] == 1.0
    with pytest.raises(ValueError, match="'truth'"):
        index_tuning.sweep_search_params(hnsw, q, [{}])
    with pytest.raises(ValueError, match="'n'"):
        index_tuning.clustered_vectors(0, 4)


def test_index_tuning_builds_on_index_and_index_never_imports_it():
    """The import graph flows one way: index_tuning -> index -> index_backends / index_storage."""
    import ast
    import inspect

    from utils_cv.similarity import index, index_backends, index_storage

    def imports(module):
        found = set()
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                found |= {node.module or ""} | {f"{node.module}.{a.name}" for a in node.names}
        return found

    assert not any("index_tuning" in name for name in imports(index))
    for module in (index_backends, index_storage):
        assert not any(name.endswith((".index", ".index_tuning")) for name in imports(module))
    assert "utils_cv.similarity.index.SimilarityIndex" in imports(index_tuning)
    assert not hasattr(SimilarityIndex, "recommend")
