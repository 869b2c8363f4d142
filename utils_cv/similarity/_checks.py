"""Input validation shared by every module of :mod:`utils_cv.similarity`.

Public inside the package (no leading underscore on the functions): ``distances``,
``index``, ``metrics``, ``rerank``, ``plot`` and the rest import from here rather than from
each other's private helpers. Every check raises a ``ValueError`` that names the parameter
and says what it must be.
"""
from __future__ import annotations

import numpy as np

__all__ = ["DISTANCES", "as_matrix", "check_distance", "check_labels", "positive_int", "positive_int_text"]

DISTANCES = ("l2", "cosine")


_MAX_SQUARED_NORM = float(np.finfo(np.float32).max) / 4  # |x|^2 + |y|^2 + 2|x||y| stays finite below it


def as_matrix(x, name: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 (n, d) array of finite values whose float32 distances
    cannot overflow (rows of L2 norm under about 9.2e18), or a ValueError naming ``name``."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"The {name!r} parameter must be a 2-D (n, d) array. Got shape {x.shape} instead.")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"The {name!r} parameter must hold floats. Got dtype {x.dtype} instead.")
    if x.shape[1] == 0:
        raise ValueError(f"The {name!r} parameter has 0 columns (shape {x.shape}): features need at least one "
                         "dimension.")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"The {name!r} parameter contains NaN or infinite values.")
    if len(x) and x.shape[1] * max(float(x.max()), -float(x.min())) ** 2 > _MAX_SQUARED_NORM:  # one cheap bound first
        largest = float(np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64).max()))
        if largest * largest > _MAX_SQUARED_NORM:  # a distance (or a norm) between such rows overflows float32
            raise ValueError(f"The {name!r} parameter has rows of L2 norm up to {largest:.3g}: distances between such "
                             f"rows overflow float32. Scale the features down first (e.g. L2-normalise them).")
    return x


def positive_int(value, name: str) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an int >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"The {name!r} parameter must be a positive integer. Got {value!r} instead.")


def check_distance(distance: str) -> None:
    """Raise a ValueError unless ``distance`` is one of :data:`DISTANCES`."""
    if distance not in DISTANCES:
        raise ValueError(f"The 'distance' parameter must be one of {set(DISTANCES)}. Got {distance!r} instead.")


_LAYOUT_HINT = ("lay the image folder out with one sub-folder per class (root/<class name>/<image>) and list it "
                "with data.list_images(root), or pass one label per item")


def _is_missing(x) -> bool:
    if x is None:
        return True
    if isinstance(x, (str, bytes)):
        return not x.strip()
    try:
        return bool(x != x)  # NaN, NaT
    except TypeError:  # pd.NA: comparing it gives NA, which refuses bool()
        return True


def check_labels(labels, name: str = "labels", n: int | None = None) -> np.ndarray:
    """``labels`` as a 1-D array, after checking that none is missing.

    Args:
        labels: one class label per item (list, tuple, array, pandas Series).
        name: the parameter name the error messages use.
        n: when given, the number of labels required (one per row of the features).

    Raises:
        ValueError: ``labels`` is None (a plain folder has no labels: the message says how
            to lay the folder out), empty, not 1-D, or holds a missing label (None, NaN,
            ``pd.NA``, NaT, an empty or blank string); the message gives the first position.
    """
    if labels is None:
        raise ValueError(f"The {name!r} parameter is None, but this needs class labels: {_LAYOUT_HINT}.")
    if isinstance(labels, (str, bytes)):
        raise ValueError(f"The {name!r} parameter must be a sequence of labels, one per item. Got a string.")
    if isinstance(labels, np.ndarray):
        arr = labels
    else:
        try:
            items = list(labels)
        except TypeError:
            raise ValueError(f"The {name!r} parameter must be a sequence of labels, one per item. "
                             f"Got {type(labels).__name__}.") from None
        _raise_on_missing(items, name)  # before np.asarray, which turns NaN among strings into 'nan'
        arr = np.asarray(items)
    if arr.ndim != 1 or len(arr) == 0:
        raise ValueError(f"The {name!r} parameter must be a non-empty 1-D sequence of labels. Got shape {arr.shape}.")
    if n is not None and len(arr) != n:
        raise ValueError(f"The {name!r} parameter must hold one label per row ({n}); got {len(arr)}.")
    if arr.dtype.kind == "f":
        _raise_at(np.flatnonzero(np.isnan(arr)), arr, name)
    elif arr.dtype.kind in "mM":
        _raise_at(np.flatnonzero(np.isnat(arr)), arr, name)
    elif arr.dtype.kind in "US":
        _raise_at(np.flatnonzero(np.char.strip(arr) == arr.dtype.type("")), arr, name)
    elif arr.dtype.kind == "O":
        _raise_on_missing(arr, name)
    return arr


def _raise_on_missing(items, name: str) -> None:
    for i, x in enumerate(items):
        if _is_missing(x):
            _raise_at([i], items, name)


def _raise_at(bad, items, name: str) -> None:
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"The {name!r} parameter has a missing label ({items[i]!r}) at position {i}"
                         f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}; every item needs a class label. "
                         "Drop the unlabelled items (and their paths or features) first.")


def positive_int_text(text: str) -> int:
    """argparse ``type=`` for options that must be positive integers (refused before any work)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value
