"""Versions of the libraries that shape saved models and indexes, recorded beside them."""
from __future__ import annotations

import importlib


def library_versions(*names: str) -> dict[str, str]:
    """``{name: __version__}`` for utils_cv and each importable library in ``names``."""
    import utils_cv

    out = {"utils_cv": utils_cv.__version__}
    for name in names:
        try:
            out[name] = importlib.import_module(name).__version__
        except (ImportError, AttributeError):
            continue
    return out
