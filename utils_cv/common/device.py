"""Device selection."""
from __future__ import annotations

import torch


def default_device() -> torch.device:
    """CUDA when available, else Apple MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
