"""Device selection: one rule for features and training, overridable by argument or environment.

torch is imported when a device is chosen, not when this module is imported, so that
``import utils_cv.common`` stays light (notebook helpers use it without touching torch).
"""
from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["DEVICE_ENV", "default_device"]

DEVICE_ENV = "UTILS_CV_DEVICE"
_VALID = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def _parse(value: str, source: str) -> str:
    text = value.strip().lower()
    if not _VALID.match(text):
        raise ValueError(f"{source} must be one of 'cpu', 'mps', 'cuda' or 'cuda:N' (or 'auto'). "
                         f"Got {value!r} instead.")
    return text


def default_device(override: str | torch.device | None = None) -> torch.device:
    """The device to run on.

    The first that applies: ``override`` (a device name or ``torch.device``); the environment
    variable ``UTILS_CV_DEVICE`` (``cpu``, ``mps``, ``cuda``, ``cuda:1``); else CUDA when
    available, then Apple MPS, then the CPU. ``"auto"`` (argument or variable) or an empty
    variable means "choose". A device asked for by name must exist here: asking for CUDA on a
    machine without it is an error, not a silent fall-back to the CPU.

    Raises:
        ValueError: an unknown device name, or a named device this machine does not have; the
            message names where the choice came from (``override`` or ``UTILS_CV_DEVICE``).
    """
    import torch

    if isinstance(override, torch.device):
        choice, source = str(override), "The 'override' parameter"
    elif override is not None and str(override).strip().lower() != "auto":
        if not isinstance(override, str):
            raise ValueError(f"The 'override' parameter must be a device name, a torch.device or None. "
                             f"Got {type(override).__name__}.")
        choice, source = _parse(override, "The 'override' parameter"), "The 'override' parameter"
    else:
        env = os.environ.get(DEVICE_ENV, "").strip()
        if env and env.lower() != "auto":
            choice, source = _parse(env, f"The environment variable {DEVICE_ENV}"), f"{DEVICE_ENV}={env}"
        else:
            choice, source = None, None
    if choice is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(choice)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"{source} asks for {choice!r}, but this machine has {count} CUDA device(s); "
                             f"use 'cpu' or unset {DEVICE_ENV}.")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"{source} asks for 'mps', but Apple MPS is not available here; "
                             f"use 'cpu' or unset {DEVICE_ENV}.")
    return device
