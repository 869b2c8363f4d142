"""Input validation shared by every module of :mod:`utils_cv.similarity`.

Public inside the package (no leading underscore on the functions): ``distances``,
``index``, ``metrics``, ``rerank``, ``plot`` and the rest import from here rather than from
each other's private helpers. Every check raises a ``ValueError`` that names the parameter
and says what it must be.
"""
from __future__ import annotations

import numpy as np

__all__ = ["DISTANCES", "as_matrix", "check_distance", "positive_int"]

DISTANCES = ("l2", "cosine")


def as_matrix(x, name: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 (n, d) array of finite values, or a ValueError naming ``name``."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"The {name!r} parameter must be a 2-D (n, d) array. Got shape {x.shape} instead.")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"The {name!r} parameter must hold floats. Got dtype {x.dtype} instead.")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"The {name!r} parameter contains NaN or infinite values.")
    return x


def positive_int(value, name: str) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an int >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"The {name!r} parameter must be a positive integer. Got {value!r} instead.")


def check_distance(distance: str) -> None:
    """Raise a ValueError unless ``distance`` is one of :data:`DISTANCES`."""
    if distance not in DISTANCES:
        raise ValueError(f"The 'distance' parameter must be one of {set(DISTANCES)}. Got {distance!r} instead.")


def _missing(value) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN (float, numpy, pandas) is the only value unequal to itself
    except (TypeError, ValueError):
        return False


def check_labels(labels, name: str = "labels", n: int | None = None) -> np.ndarray:
    """``labels`` as a 1-D numpy array, with one rule for missing labels everywhere: ``None``
    and NaN are refused with a ValueError naming the parameter and the first position (an
    unlabelled image belongs in a plain folder, not in a labelled evaluation). ``n``: the
    number of rows the labels must match."""
    arr = np.asarray(labels, dtype=object) if not isinstance(labels, np.ndarray) else labels
    if arr.ndim != 1:
        raise ValueError(f"The {name!r} parameter must be a 1-D sequence of labels. Got shape {arr.shape}.")
    if n is not None and len(arr) != n:
        raise ValueError(f"The {name!r} parameter must hold one label per row ({n}); got {len(arr)}.")
    if arr.dtype == object or np.issubdtype(arr.dtype, np.floating):
        for i, value in enumerate(arr.tolist()):
            if _missing(value):
                raise ValueError(f"The {name!r} parameter has a missing label ({value!r}) at position {i}: "
                                 "every item needs a label (drop unlabelled items first).")
    if arr.dtype == object:  # back to a plain array of the values (str labels become '<U..')
        arr = np.asarray(arr.tolist())
    return arr


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
