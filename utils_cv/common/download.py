"""Downloading and unpacking files from the internet, safely.

* :func:`download` checks the HTTP status, applies a timeout to every network wait and a
  total deadline to the whole transfer, verifies a SHA-256 when one is given, and writes
  through a ``.part`` file renamed into place only when complete and verified: an
  interrupted or bad download never looks like a good file.
* :func:`extract` unpacks zip and tar archives after checking every member. It writes each
  file itself and never creates a link, so no member can be redirected outside the target.

Why not pooch or ``torch.hub``: ``torch.hub.download_url_to_file`` opens the URL without a
timeout, and pooch's ``Untar``/``Unzip`` call the interpreter's ``extractall``, whose
``filter="data"`` is defeated on Python 3.11.7 by CVE-2025-4517 (a long-path symlink chain)
and does not exist for zip files. Neither caps the expanded size of an archive.

Both honour ``UTILS_CV_OFFLINE=1``: :func:`download` then raises instead of connecting.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import math
import numbers
import os
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, IO

from utils_cv.common.paths import offline, sha256sum

__all__ = ["DownloadError", "UnsafeArchiveError", "download", "extract", "sha256sum",
           "MAX_SIZE", "MAX_MEMBERS", "MAX_RATIO", "MIN_RATE"]

log = logging.getLogger(__name__)

MAX_SIZE = 20 * 10**9  # bytes an archive may expand to (20 GB)
MAX_MEMBERS = 1_000_000  # entries an archive may hold
MAX_RATIO = 200  # expanded size / archive size; photos compress ~1:1, text ~1:10
RATIO_FLOOR = 64 * 2**20  # archives expanding to less than this are not ratio-checked
MIN_RATE = 10_000  # bytes/s a download must average once its grace period is over


class DownloadError(RuntimeError):
    """A download failed: network error, timeout, deadline, HTTP status, size or checksum mismatch."""


class UnsafeArchiveError(ValueError):
    """An archive holds a member that is not a plain file or folder inside the target, or
    expands beyond the size, count or compression-ratio limits."""


def _positive(value, name: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"The {name!r} parameter must be a positive number. Got {value!r} instead.")
    return value


def download(url: str, dest, sha256: str | None = None, timeout: float = 30, progress: bool = True,
             chunk_size: int = 1 << 20, deadline: float | None = None) -> Path:
    """Download ``url`` to the file ``dest`` (or into the folder ``dest``, named after the URL).

    Args:
        sha256: expected hex digest; the file is kept only if it matches. A file already at
            ``dest`` with this digest is not downloaded again.
        timeout: seconds to wait for the connection and for each read.
        progress: a tqdm progress bar.
        deadline: seconds the whole transfer may take, from the request to the last byte.
            None: no fixed limit, but once ``10 * timeout`` seconds have passed the transfer
            must have averaged at least ``MIN_RATE`` (10 kB/s), so a server trickling a byte
            now and then cannot hold the call forever while a large file on a slow but
            working link still completes. The check runs between reads, so the cut comes
            at most ``timeout`` seconds late.

    Returns:
        The path of the complete file.

    Raises:
        DownloadError: offline mode, network failure or timeout, deadline passed, HTTP
            status other than 200, fewer bytes than announced, or a checksum mismatch; the
            message names the URL. Nothing is left under ``dest`` then.
    """
    _positive(timeout, "timeout")
    _positive(deadline, "deadline", allow_none=True)
    if sha256 is not None and (len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256.lower())):
        raise ValueError(f"The 'sha256' parameter must be 64 hex digits. Got {sha256!r} instead.")
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"The 'url' parameter must be an http(s) URL. Got {url!r} instead.")
    dest = Path(dest)
    if dest.is_dir():
        name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
        if not name:
            raise ValueError(f"Cannot name a file after {url!r}; give 'dest' as a file path.")
        dest = dest / name
    if sha256 is not None and dest.is_file() and sha256sum(dest) == sha256.lower():
        log.info("%s is already complete (sha256 matches)", dest)
        return dest
    if offline():
        raise DownloadError(f"Offline mode (UTILS_CV_OFFLINE=1): not downloading {url}. Copy the file to {dest} "
                            "from a machine with network access.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, part = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    part = Path(part)
    start = time.monotonic()
    try:
        h = hashlib.sha256()
        received = 0
        request = urllib.request.Request(url, headers={"User-Agent": "utils_cv"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            status = getattr(response, "status", 200)
            if status != 200:
                raise DownloadError(f"{url}: HTTP status {status}, expected 200.")
            total = response.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            # read1 returns what one socket read brings, so the deadline is checked while a
            # slow server sends, not only after a full chunk has arrived.
            read = getattr(response, "read1", response.read)
            bar = _bar(total, dest.name, progress)
            try:
                while True:
                    block = read(chunk_size)
                    if not block:
                        break
                    out.write(block)
                    h.update(block)
                    received += len(block)
                    bar.update(len(block))
                    _check_deadline(url, start, received, timeout, deadline)
            finally:
                bar.close()
            out.flush()
            os.fsync(out.fileno())
        if total is not None and received != total:
            raise DownloadError(f"{url}: received {received} bytes of the {total} announced; the transfer was cut.")
        digest = h.hexdigest()
        if sha256 is not None and digest != sha256.lower():
            raise DownloadError(f"{url}: sha256 {digest} does not match the expected {sha256.lower()}; "
                                "the file was not kept.")
        os.chmod(part, 0o644)
        os.replace(part, dest)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url}: HTTP status {exc.code} ({exc.reason}).") from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"{url}: download failed ({type(exc).__name__}: {reason}); timeout was {timeout} s.") from exc
    finally:
        part.unlink(missing_ok=True)
    log.info("downloaded %s (%d bytes) to %s", url, received, dest)
    return dest


def _check_deadline(url: str, start: float, received: int, timeout: float, deadline: float | None) -> None:
    elapsed = time.monotonic() - start
    if deadline is not None:
        if elapsed > deadline:
            raise DownloadError(f"{url}: not complete after {elapsed:.1f} s, past the deadline of {deadline} s "
                                f"({received} bytes received); pass a larger 'deadline' for a slow link.")
    elif elapsed > 10 * timeout and received < MIN_RATE * elapsed:
        raise DownloadError(f"{url}: {received} bytes in {elapsed:.1f} s, under {MIN_RATE} bytes/s on average; "
                            "the server is too slow. Pass 'deadline' (seconds) to allow a slower transfer.")


def _bar(total, name, progress):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=not progress, leave=False)


# ---------------------------------------------------------------------------- extraction
@dataclass
class _Member:
    name: PurePosixPath
    is_dir: bool
    size: int
    mtime: float | None
    open: Callable[[], IO[bytes]] | None


def _safe_name(name: str, archive: Path) -> PurePosixPath:
    if "\x00" in name:
        raise UnsafeArchiveError(f"{archive}: member {name!r} has a NUL byte in its name; refusing to extract.")
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or (p.parts and (p.parts[0].endswith(":") or name.startswith(("/", "\\")))):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract.")
    if ".." in p.parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} points outside the target folder (..); "
                                 "refusing to extract.")
    return p


def _refuse_kind(archive: Path, name: str, kind: str) -> None:
    if kind == "link":
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} is a link. Archives with symbolic or hard links are refused: a data "
            "set needs none, and a chain of links can point outside the target folder.")
    raise UnsafeArchiveError(f"{archive}: member {name!r} is a {kind}, not a file or folder; refusing to extract.")


def _zip_members(zf: zipfile.ZipFile, archive: Path, max_members: int):
    for count, info in enumerate(zf.infolist(), 1):
        if count > max_members:
            raise UnsafeArchiveError(f"{archive}: more than max_members={max_members} entries; pass a larger "
                                     "'max_members' if you trust it.")
        name = _safe_name(info.filename, archive)
        fmt = stat.S_IFMT(info.external_attr >> 16)
        if fmt == stat.S_IFLNK:
            _refuse_kind(archive, info.filename, "link")
        if fmt not in (0, stat.S_IFREG, stat.S_IFDIR):
            _refuse_kind(archive, info.filename, "device, FIFO or socket")
        if info.flag_bits & 0x1:
            raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is encrypted; extract it with the "
                                     "password by other means.")
        mtime = time.mktime(info.date_time + (0, 0, -1))
        yield _Member(name, info.is_dir(), 0 if info.is_dir() else info.file_size, mtime,
                      None if info.is_dir() else (lambda info=info: zf.open(info)))


def _tar_members(tf: tarfile.TarFile, archive: Path, max_members: int):
    for count, m in enumerate(tf, 1):
        if count > max_members:
            raise UnsafeArchiveError(f"{archive}: more than max_members={max_members} entries; pass a larger "
                                     "'max_members' if you trust it.")
        name = _safe_name(m.name, archive)
        if m.issym() or m.islnk():
            _refuse_kind(archive, m.name, "link")
        if not (m.isfile() or m.isdir()):
            _refuse_kind(archive, m.name, "device, FIFO or other special file")
        yield _Member(name, m.isdir(), m.size if m.isfile() else 0, m.mtime,
                      None if m.isdir() else (lambda m=m: tf.extractfile(m)))


def _plan(members, archive: Path, max_size: int, max_ratio: float) -> list[_Member]:
    """All members, checked as a whole before anything is written."""
    plan, files, dirs, total = [], set(), set(), 0
    for m in members:
        if not m.name.parts:  # "./" or "": the target folder itself
            continue
        if m.name in files or (not m.is_dir and m.name in dirs):
            raise UnsafeArchiveError(f"{archive}: {str(m.name)!r} appears more than once, or as both a file and a "
                                     "folder; refusing to extract an ambiguous archive.")
        (dirs if m.is_dir else files).add(m.name)
        dirs.update(m.name.parents[:-1])
        total += m.size
        if total > max_size:
            raise UnsafeArchiveError(f"{archive}: expands to more than max_size={max_size} bytes; pass a larger "
                                     "'max_size' if you trust it and have the space.")
        plan.append(m)
    clash = files & dirs
    if clash:
        raise UnsafeArchiveError(f"{archive}: {str(sorted(clash)[0])!r} is both a file and a folder in this archive; "
                                 "refusing to extract an ambiguous archive.")
    packed = max(archive.stat().st_size, 1)
    if total > RATIO_FLOOR and total > max_ratio * packed:
        raise UnsafeArchiveError(
            f"{archive}: {packed} bytes would expand to {total} bytes (ratio {total / packed:.0f}, above "
            f"max_ratio={max_ratio}), the signature of a compression bomb; pass a larger 'max_ratio' if you trust it.")
    return plan


def _write(plan: list[_Member], root: Path, archive: Path, max_size: int) -> None:
    """Write the planned members under ``root``: folders with mkdir, files with O_EXCL |
    O_NOFOLLOW. No link is ever created, so every path stays inside ``root``."""
    written = 0
    for m in plan:
        target = root.joinpath(*m.name.parts)
        if m.is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        size = 0
        with os.fdopen(fd, "wb") as out, m.open() as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                size += len(block)
                written += len(block)
                if size > m.size or written > max_size:
                    raise UnsafeArchiveError(f"{archive}: member {str(m.name)!r} expands beyond its declared "
                                             f"{m.size} bytes; refusing a forged archive.")
                out.write(block)
        if m.mtime is not None and math.isfinite(m.mtime):
            os.utime(target, (m.mtime, m.mtime))


def extract(archive, dest, *, max_size: int = MAX_SIZE, max_members: int = MAX_MEMBERS,
            max_ratio: float = MAX_RATIO) -> Path:
    """Unpack a zip or tar (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz) archive into ``dest``.

    Only plain files and folders are extracted. Refused before anything is written, with
    :class:`UnsafeArchiveError` naming the member: absolute paths, ``..`` components,
    symbolic and hard links (a data set needs none; checking where a chain of links
    resolves is how the interpreter's own filter was defeated, so links are not written at
    all), devices, FIFOs, duplicate names, and archives beyond the limits below. Files are
    written with mode 0644 and their stored modification time.

    Contents are unpacked into a temporary folder beside ``dest`` and moved in at the end;
    an entry that already exists in ``dest`` raises ``FileExistsError`` before anything moves.

    Args:
        max_size: bytes the archive may expand to in total (checked against the declared
            sizes first, then while writing).
        max_members: entries the archive may hold.
        max_ratio: expanded size / archive size allowed once the expansion exceeds 64 MiB
            (a compression bomb).

    Returns:
        ``dest``.
    """
    _positive(max_size, "max_size")
    _positive(max_members, "max_members")
    _positive(max_ratio, "max_ratio")
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise FileNotFoundError(f"Archive {str(archive)!r} does not exist.")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                plan = _plan(_zip_members(zf, archive, max_members), archive, max_size, max_ratio)
                _write(plan, tmp, archive, max_size)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                plan = _plan(_tar_members(tf, archive, max_members), archive, max_size, max_ratio)
                _write(plan, tmp, archive, max_size)
        else:
            raise ValueError(f"{str(archive)!r} is neither a zip nor a tar archive.")
        entries = list(tmp.iterdir())
        clash = [e.name for e in entries if (dest / e.name).exists() or (dest / e.name).is_symlink()]
        if clash:
            raise FileExistsError(f"{str(dest)!r} already holds {clash[:3]} from this archive; extract into an "
                                  "empty folder or remove them first.")
        for e in entries:
            os.replace(e, dest / e.name)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ValueError(f"{str(archive)!r} is a truncated or corrupt tar archive ({exc}).") from exc
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{str(archive)!r} is a truncated or corrupt zip archive ({exc}).") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("extracted %s into %s", archive, dest)
    return dest
