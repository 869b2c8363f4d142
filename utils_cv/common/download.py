"""Downloading and unpacking files from the internet, safely.

* :func:`download` checks the HTTP status, applies a timeout to every network wait, verifies
  a SHA-256 when one is given, and writes through a ``.part`` file renamed into place only
  when complete and verified: an interrupted or bad download never looks like a good file.
* :func:`extract` unpacks zip and tar archives after checking every member: absolute paths,
  ``..`` components, links pointing outside the target and device files are refused before
  anything is written ("zip slip"). It unpacks into a temporary folder beside the target and
  moves the result in at the end, so a failure leaves the target as it was.

Both honour ``UTILS_CV_OFFLINE=1``: :func:`download` then raises instead of connecting.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from utils_cv.common.paths import offline

__all__ = ["DownloadError", "UnsafeArchiveError", "download", "extract", "sha256sum"]

log = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """A download failed: network error, timeout, HTTP status, size or checksum mismatch."""


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the target folder (or is a device / odd file)."""


def sha256sum(path, chunk_size: int = 1 << 20) -> str:
    """The hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest, sha256: str | None = None, timeout: float = 30, progress: bool = True,
             chunk_size: int = 1 << 20) -> Path:
    """Download ``url`` to the file ``dest`` (or into the folder ``dest``, named after the URL).

    Args:
        sha256: expected hex digest; the file is kept only if it matches. A file already at
            ``dest`` with this digest is not downloaded again.
        timeout: seconds to wait for the connection and for each read.
        progress: a tqdm progress bar.

    Returns:
        The path of the complete file.

    Raises:
        DownloadError: offline mode, network failure or timeout, HTTP status other than
            200, fewer bytes than announced, or a checksum mismatch; the message names the
            URL. Nothing is left under ``dest`` then.
    """
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ValueError(f"The 'timeout' parameter must be a positive number of seconds. Got {timeout!r} instead.")
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
            bar = _bar(total, dest.name, progress)
            try:
                while True:
                    block = response.read(chunk_size)
                    if not block:
                        break
                    out.write(block)
                    h.update(block)
                    received += len(block)
                    bar.update(len(block))
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


def _bar(total, name, progress):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=not progress, leave=False)


# ---------------------------------------------------------------------------- extraction
def _safe_name(name: str, archive: Path) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or (p.parts and (p.parts[0].endswith(":") or name.startswith(("/", "\\")))):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract.")
    if ".." in p.parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} points outside the target folder (..); "
                                 "refusing to extract.")
    return p


def _link_inside(member_path: PurePosixPath, target: str, archive: Path, name: str) -> None:
    t = PurePosixPath(target.replace("\\", "/"))
    if t.is_absolute():
        raise UnsafeArchiveError(f"{archive}: link {name!r} points to the absolute path {target!r}; refusing.")
    depth = len(member_path.parent.parts)
    for part in t.parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            raise UnsafeArchiveError(f"{archive}: link {name!r} -> {target!r} points outside the target folder; "
                                     "refusing to extract.")


def _check_tar(tf: tarfile.TarFile, archive: Path) -> None:
    for m in tf.getmembers():
        p = _safe_name(m.name, archive)
        if m.issym():
            _link_inside(p, m.linkname, archive, m.name)
        elif m.islnk():  # a hard link names another member: it must stay inside too
            try:
                _safe_name(m.linkname, archive)
            except UnsafeArchiveError:
                raise UnsafeArchiveError(f"{archive}: hard link {m.name!r} -> {m.linkname!r} points outside the "
                                         "target folder; refusing to extract.") from None
        elif not (m.isfile() or m.isdir()):
            raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a device, FIFO or other special file; refusing.")


def _check_zip(zf: zipfile.ZipFile, archive: Path) -> None:
    for info in zf.infolist():
        p = _safe_name(info.filename, archive)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):  # a symlink stored by Info-ZIP: its target is the member's data
            _link_inside(p, zf.read(info).decode("utf-8", "replace"), archive, info.filename)


def extract(archive, dest) -> Path:
    """Unpack a zip or tar (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz) archive into ``dest``.

    Every member is checked before anything is written; an unsafe one raises
    :class:`UnsafeArchiveError` naming it. Contents are unpacked into a temporary folder
    beside ``dest`` and moved in at the end; an entry that already exists in ``dest`` raises
    ``FileExistsError`` before anything moves.

    Returns:
        ``dest``.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise FileNotFoundError(f"Archive {str(archive)!r} does not exist.")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                _check_zip(zf, archive)
                for info in zf.infolist():
                    if stat.S_ISLNK(info.external_attr >> 16):
                        target = tmp / PurePosixPath(info.filename)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        os.symlink(zf.read(info).decode("utf-8"), target)
                    else:
                        zf.extract(info, tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                _check_tar(tf, archive)
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(tmp, filter="data")
                else:  # Python < 3.12 without the filter backport: the checks above did the work
                    tf.extractall(tmp)
        else:
            raise ValueError(f"{str(archive)!r} is neither a zip nor a tar archive.")
        entries = list(tmp.iterdir())
        clash = [e.name for e in entries if (dest / e.name).exists() or (dest / e.name).is_symlink()]
        if clash:
            raise FileExistsError(f"{str(dest)!r} already holds {clash[:3]} from this archive; extract into an "
                                  "empty folder or remove them first.")
        for e in entries:
            os.replace(e, dest / e.name)
    except tarfile.TarError as exc:
        raise ValueError(f"{str(archive)!r} is a damaged tar archive ({exc}).") from exc
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{str(archive)!r} is a damaged zip archive ({exc}).") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("extracted %s into %s", archive, dest)
    return dest
