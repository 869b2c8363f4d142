"""Labels, splits and comparative sets: the parts of a data set that need class labels.

Kept apart from the folder reading in :mod:`utils_cv.similarity.data` (which re-exports
every name here) because they work on any label sequence, not only on listed folders.

One rule for missing labels everywhere (:func:`check_labels`): None, NaN, ``pd.NA``/NaT
and empty or blank strings are missing, and a missing label is a ``ValueError`` naming the
parameter and the first position, never dropped silently or counted as a class of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from utils_cv.similarity._checks import check_labels

__all__ = ["ComparativeSet", "check_labels", "comparative_sets", "split_by_class", "split_by_image"]

def _aligned(paths, y: np.ndarray) -> None:
    if len(paths) != len(y):
        raise ValueError(f"'paths' has {len(paths)} items but 'labels' has {len(y)}: they must be aligned.")


def split_by_image(paths, labels, test_size: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of images: each class keeps about ``test_size`` of its images for test.

    Every class with at least 2 images has at least one image on each side. Returns sorted
    int64 index arrays ``(train_idx, test_idx)``; the same seed gives the same split.

    Not scikit-learn's ``train_test_split(stratify=...)``: that gives a different split on
    the same seed (so the published numbers would move), refuses a test set smaller than
    the number of classes, and may leave a small class without a test or a training image;
    here every class of two or more images is on both sides, which retrieval metrics (a
    query needs a same-class image in the gallery) and the classifier head rely on.
    """
    y = check_labels(labels)
    _aligned(paths, y)
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float, np.number)) or not 0.0 < test_size < 1.0:
        raise ValueError(f"The 'test_size' parameter must be in (0, 1). Got {test_size!r} instead.")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.nonzero(y == c)[0])
        n_test = int(round(test_size * len(idx)))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test += idx[:n_test].tolist()
        train += idx[n_test:].tolist()
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(test), dtype=np.int64)


def split_by_class(paths, labels, test_classes: float | int | Sequence = 0.5, seed: int = 0,
                   by_name: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Split by class (the metric-learning protocol): train and test share no class.

    Args:
        test_classes: share of classes for test (float in (0, 1)), their number (int), or
            the test class names themselves.
        seed: picks the test classes at random (when given as a share or a number).
        by_name: instead of a random pick, the last classes in name order are the test
            classes: the convention of CUB-200-2011, Cars-196 and Stanford Online Products,
            whose folders are numbered by class id (the first 100 of CUB's 200 train).

    Returns:
        Sorted int64 index arrays ``(train_idx, test_idx)``.
    """
    y = check_labels(labels)
    _aligned(paths, y)
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError("split_by_class needs at least 2 classes.")
    if isinstance(test_classes, (list, tuple, set, np.ndarray)):
        chosen = set(test_classes)
        unknown = chosen - set(classes.tolist())
        if unknown:
            raise ValueError(f"The 'test_classes' parameter names unknown classes {sorted(unknown)}.")
    else:
        if isinstance(test_classes, float):
            if not 0.0 < test_classes < 1.0:
                raise ValueError(f"The 'test_classes' parameter as a share must be in (0, 1). Got {test_classes!r}.")
            n = int(round(test_classes * len(classes)))
        else:
            n = int(test_classes)
        n = min(max(n, 1), len(classes) - 1)
        order = np.sort(classes)[::-1] if by_name else np.random.default_rng(seed).permutation(classes)
        chosen = set(order[:n].tolist())
    is_test = np.isin(y, list(chosen))
    if is_test.all() or not is_test.any():
        raise ValueError("split_by_class would leave train or test empty; choose fewer test classes.")
    return np.nonzero(~is_test)[0].astype(np.int64), np.nonzero(is_test)[0].astype(np.int64)


@dataclass(frozen=True)
class ComparativeSet:
    """One query image, one positive (same class) and N negatives (other classes), as indices."""

    query: int
    positive: int
    negatives: np.ndarray


def comparative_sets(labels, num_negatives: int = 99, seed: int = 0) -> list[ComparativeSet]:
    """One comparative set per image: the image as query, a random other image of its class as
    positive, ``num_negatives`` images of other classes drawn without replacement.

    Raises:
        ValueError: a label is missing, a class has a single image (no positive) or fewer
            than ``num_negatives`` images lie outside some class.
    """
    y = check_labels(labels)
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, (int, np.integer)) or num_negatives < 1:
        raise ValueError(f"The 'num_negatives' parameter must be a positive integer. Got {num_negatives!r} instead.")
    classes, counts = np.unique(y, return_counts=True)
    single = classes[counts < 2]
    if len(single):
        raise ValueError(
            f"Classes {single.tolist()[:5]} have a single image, so their queries have no positive; "
            "add images or leave those classes out."
        )
    short = [c for c, n in zip(classes, counts) if len(y) - n < num_negatives]
    if short:
        raise ValueError(
            f"Only {len(y) - counts[classes.tolist().index(short[0])]} images lie outside class {short[0]!r}, "
            f"fewer than num_negatives={num_negatives}; lower 'num_negatives'."
        )
    rng = np.random.default_rng(seed)
    by_class = {c: np.nonzero(y == c)[0] for c in classes}
    others = {c: np.nonzero(y != c)[0] for c in classes}
    sets = []
    for i, c in enumerate(y):
        same = by_class[c]
        positive = int(rng.choice(same[same != i]))
        negatives = rng.choice(others[c], size=num_negatives, replace=False)
        sets.append(ComparativeSet(i, positive, negatives.astype(np.int64)))
    return sets
