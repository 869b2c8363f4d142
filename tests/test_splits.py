import numpy as np
import pytest

from utils_cv.similarity import data

LABELS = ["a"] * 10 + ["b"] * 5 + ["c"] * 2 + ["d"] * 8
PATHS = [f"img{i}.jpg" for i in range(len(LABELS))]


def test_split_by_image_is_stratified_and_reproducible():
    tr, te = data.split_by_image(PATHS, LABELS, test_size=0.2, seed=1)
    assert len(set(tr) & set(te)) == 0 and len(tr) + len(te) == len(LABELS)
    y = np.array(LABELS)
    for c in "abcd":
        assert (y[te] == c).sum() >= 1 and (y[tr] == c).sum() >= 1
    assert (y[te] == "a").sum() == 2
    tr2, te2 = data.split_by_image(PATHS, LABELS, test_size=0.2, seed=1)
    assert te.tolist() == te2.tolist()
    with pytest.raises(ValueError, match="test_size"):
        data.split_by_image(PATHS, LABELS, test_size=1.5)
    with pytest.raises(ValueError, match="aligned"):
        data.split_by_image(PATHS[:3], LABELS)


def test_split_by_class_is_disjoint():
    tr, te = data.split_by_class(PATHS, LABELS, test_classes=0.5, seed=0)
    y = np.array(LABELS)
    assert set(y[tr]).isdisjoint(set(y[te]))
    assert len(set(y[te])) == 2
    tr, te = data.split_by_class(PATHS, LABELS, test_classes=["c"])
    assert set(y[te]) == {"c"}
    with pytest.raises(ValueError, match="unknown classes"):
        data.split_by_class(PATHS, LABELS, test_classes=["zzz"])


def test_comparative_sets_reproducible_without_repeats():
    sets = data.comparative_sets(LABELS, num_negatives=10, seed=4)
    again = data.comparative_sets(LABELS, num_negatives=10, seed=4)
    other = data.comparative_sets(LABELS, num_negatives=10, seed=5)
    assert len(sets) == len(LABELS)
    y = np.array(LABELS)
    for s, t in zip(sets, again):
        assert s.query == t.query and s.positive == t.positive and s.negatives.tolist() == t.negatives.tolist()
        assert s.positive != s.query and y[s.positive] == y[s.query]
        assert len(set(s.negatives.tolist())) == 10
        assert (y[s.negatives] != y[s.query]).all()
    assert any(s.negatives.tolist() != o.negatives.tolist() for s, o in zip(sets, other))


def test_comparative_sets_clear_errors():
    with pytest.raises(ValueError, match="single image"):
        data.comparative_sets(["a", "a", "b"], num_negatives=1)
    with pytest.raises(ValueError, match="fewer than num_negatives"):
        data.comparative_sets(LABELS, num_negatives=99)


def test_split_by_class_by_name_takes_the_last_classes_as_test():
    labels = ["003.c"] * 2 + ["001.a"] * 3 + ["002.b"] * 2 + ["004.d"] * 2
    paths = [f"{i}.jpg" for i in range(len(labels))]
    tr, te = data.split_by_class(paths, labels, test_classes=0.5, by_name=True, seed=123)
    assert sorted({labels[i] for i in te}) == ["003.c", "004.d"]
    assert sorted({labels[i] for i in tr}) == ["001.a", "002.b"]


def test_disjoint_split_has_no_class_in_common():
    from utils_cv.similarity import experiment

    labels = [f"{c:03d}" for c in range(10) for _ in range(3)]
    paths = [f"{i}.jpg" for i in range(len(labels))]
    s = experiment.disjoint_split(paths, labels, test_classes=0.5, valid_classes=0.2, seed=0)
    classes = {k: set(v[1]) for k, v in s.items()}
    assert classes["test"] == {f"{c:03d}" for c in range(5, 10)}
    assert len(classes["valid"]) == 1 and len(classes["train"]) == 4
    assert not (classes["train"] & classes["valid"]) and not (classes["train"] | classes["valid"]) & classes["test"]
    assert sum(len(v[0]) for v in s.values()) == 30
