"""Where files live (cache, outputs), how they are written (atomically) and fingerprinted.

:func:`sha256sum` is the one file checksum of the project: downloads, saved indexes and
model checkpoints all use it, so a digest written by one can be checked by another.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

CACHE_ENV = "UTILS_CV_CACHE"
OFFLINE_ENV = "UTILS_CV_OFFLINE"

__all__ = ["CACHE_ENV", "OFFLINE_ENV", "atomic_write", "cache_dir", "offline", "sha256sum", "target_mode"]


def cache_dir(*parts: str) -> Path:
    """The user cache folder of this library (created on demand).

    ``$UTILS_CV_CACHE`` overrides the platform default (``~/.cache/utils_cv`` on Linux).
    Nothing is created at import time.
    """
    root = os.environ.get(CACHE_ENV)
    if not root:
        from platformdirs import user_cache_dir

        root = user_cache_dir("utils_cv", appauthor=False)
    path = Path(root).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def offline() -> bool:
    """True when ``$UTILS_CV_OFFLINE`` is set to a true value: no download is attempted."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def sha256sum(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """The hex SHA-256 of the file at ``path``, read in chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def target_mode(path: Path) -> int:
    """The permission bits a file written at ``path`` should get: the existing file's, else
    what the umask gives a new file (0666 & ~umask), never the 0600 of a temporary file."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Write ``path`` through a temporary file in the same folder, renamed into place on success.

    A crash or an exception mid-write leaves any previous file untouched and no partial file
    under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, target_mode(path))  # mkstemp makes 0600; keep the mode a plain write would give
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
