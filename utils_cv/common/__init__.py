"""Shared helpers: paths and cache locations, devices, atomic file writes, downloads.

Importing this package imports no heavy library (no torch): :func:`default_device` imports
torch only when it is called.
"""

from utils_cv.common.device import DEVICE_ENV, default_device
from utils_cv.common.paths import atomic_write, cache_dir, offline

__all__ = ["DEVICE_ENV", "atomic_write", "cache_dir", "default_device", "offline"]
