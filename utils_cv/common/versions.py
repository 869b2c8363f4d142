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
        except Exception:  # noqa: BLE001 - a library that fails to import (e.g. a version clash) is left out, not fatal
            continue
    return out


TRAINING_LIBRARIES = ("torch", "torchvision", "fastai", "fastcore", "timm", "PIL", "numpy")
"""The libraries whose versions change what the same training seed learns (the recipe's numbers
moved between installs of different versions: README "Quality")."""


def versions_line(*names: str) -> str:
    """``"utils_cv 0.1.0, torch 2.4.0, ..."``: :func:`library_versions` as one line, for the
    head of a benchmark's output (``names`` defaults to :data:`TRAINING_LIBRARIES`)."""
    return ", ".join(f"{k} {v}" for k, v in library_versions(*(names or TRAINING_LIBRARIES)).items())
