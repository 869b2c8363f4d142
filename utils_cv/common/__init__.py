"""Shared helpers: paths and cache locations, devices, atomic file writes, downloads."""

from utils_cv.common.paths import atomic_write, cache_dir, offline
from utils_cv.common.device import default_device

__all__ = ["atomic_write", "cache_dir", "default_device", "offline"]
