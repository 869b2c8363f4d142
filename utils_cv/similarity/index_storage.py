"""The on-disk form of a :class:`~utils_cv.similarity.index.SimilarityIndex`: folder, lock, files.

Kept apart from ``index.py`` because it is a separate concern (what a folder may hold, who
may replace it, how every byte read back is checked) and so that the index itself stays
about search. Nothing here knows the backends: ``index.py`` checks the manifest's meaning.

An index is a folder ``NAME`` holding ``manifest.json``, ``ids.json`` and ``features.npy``
or ``index.faiss``. Guarantees:

* A save only ever replaces a folder whose manifest says it is an index of this format and
  that holds nothing but index files (or an empty folder); a regular file, a symbolic link
  or any other folder is refused before anything changes.
* The new folder is written beside the target (``.NAME.<random>.tmp``, normal permissions
  from the umask) and swapped in by two renames; a crash at any point leaves either the
  old or the new index whole (``.NAME.old`` between the renames, which ``load`` falls back on).
* Concurrent savers and loaders of the same path are serialised by ``fcntl.flock`` on
  ``.NAME.lock`` beside the folder: the swap takes the lock exclusively, a load takes it
  shared for the whole read, so a load sees one complete save, never parts of two, and two
  savers never trip over each other (the last swap wins). The lock file is left in place
  (deleting a lock file is itself racy). Where ``fcntl`` is missing (Windows) or the folder
  is read-only, loads go without the lock.
* Every file read back is checked before it is trusted: sizes and headers before any
  allocation, JSON nesting depth, id shapes, and float arrays for NaN.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; saves stay atomic, concurrent access is not guarded
    fcntl = None

__all__ = ["FORMAT", "INDEX_FILES", "WHITENING_FILE", "read_whitening", "check_save_target", "decode_id", "encode_id", "locked",
           "lock_path", "new_folder", "read_ids", "read_json", "read_matrix", "swap_in"]

FORMAT = "utils_cv.similarity.index/1"
WHITENING_FILE = "whitening.npz"
INDEX_FILES = ("manifest.json", "ids.json", "features.npy", "index.faiss", WHITENING_FILE)
MAX_ID_DEPTH = 32  # tuples of tuples deeper than this are refused rather than recursed into
MAX_JSON_BYTES = 1 << 30


def encode_id(i, depth: int = 0):
    """ids.json holds str / int / float ids as themselves, paths and tuples tagged."""
    if depth > MAX_ID_DEPTH:
        raise TypeError(f"Index ids may nest tuples at most {MAX_ID_DEPTH} deep to be saved.")
    if isinstance(i, Path):
        return {"path": str(i)}
    if isinstance(i, tuple):
        return {"tuple": [encode_id(j, depth + 1) for j in i]}
    if isinstance(i, (np.integer, np.str_)):
        return i.item()
    if i is None or isinstance(i, (str, int, float)):
        return i
    raise TypeError(f"Index ids must be str, int, float, pathlib.Path or tuples of them to be saved; got {type(i).__name__}.")


def decode_id(i, depth: int = 0):
    """The id :func:`encode_id` wrote; ValueError for anything it cannot have written."""
    if depth > MAX_ID_DEPTH:
        raise ValueError(f"an id nests deeper than {MAX_ID_DEPTH} levels")
    if isinstance(i, dict):
        if set(i) == {"path"} and isinstance(i["path"], str):
            return Path(i["path"])
        if set(i) == {"tuple"} and isinstance(i["tuple"], list):
            return tuple(decode_id(j, depth + 1) for j in i["tuple"])
        raise ValueError(f"an id object must be {{'path': str}} or {{'tuple': [...]}}; got keys {sorted(i)[:3]}")
    if isinstance(i, list):  # a plain list is read as a tuple of plain ids
        return tuple(decode_id(j, depth + 1) for j in i)
    if i is None or isinstance(i, (str, int, float)):
        return i
    raise ValueError(f"an id of type {type(i).__name__}")


def _is_index_folder(path: Path) -> bool:
    names = {p.name for p in path.iterdir()}
    if not names:
        return True  # an empty folder: nothing to lose
    if not names <= set(INDEX_FILES) or not (path / "manifest.json").is_file():
        return False
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def check_save_target(path: Path) -> None:
    """Refuse to save onto ``path`` unless it is absent, an empty folder or an index folder."""
    if path.is_symlink():
        raise FileExistsError(f"{str(path)!r} is a symbolic link; save to the folder itself or to a new path.")
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{str(path)!r} exists and is not a folder; an index is saved as a folder: choose "
                              "another path or remove that file first.")
    if not _is_index_folder(path):
        raise FileExistsError(f"{str(path)!r} is a folder that is not a saved index (no index manifest, or other "
                              "files inside); saving would replace it. Choose another path or empty it first.")


def lock_path(path: Path) -> Path:
    """The lock file beside ``path``: ``.NAME.lock`` (made by the first save)."""
    return path.with_name(f".{path.name}.lock")


def _lock_file(path: Path):
    lock = lock_path(path)
    for mode in ("a+b", "rb"):  # "rb": a read-only folder that already has a lock file
        try:
            return open(lock, mode)
        except OSError:
            continue
    return None


@contextlib.contextmanager
def locked(path: Path, shared: bool):
    """Hold ``.NAME.lock`` beside ``path``: shared for loads, exclusive for the swap of a save."""
    if fcntl is None:
        yield
        return
    handle = _lock_file(path)
    if handle is None:
        if not shared:
            raise PermissionError(f"Cannot create the lock file beside {str(path)!r}: is the folder writable?")
        yield
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        handle.close()  # releases the lock


def new_folder(parent: Path, name: str) -> Path:
    """A new, uniquely named hidden folder in ``parent`` with the umask's usual permissions
    (``tempfile.mkdtemp`` would make it private, 0700, and the index would stay so)."""
    while True:
        tmp = parent / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue


def swap_in(tmp: Path, path: Path) -> None:
    """Replace ``path`` by the complete folder ``tmp`` (caller holds the exclusive lock)."""
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        if old.exists():  # left by a save killed after both renames: ``path`` is whole
            shutil.rmtree(old)
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def read_json(path: Path):
    """Parse a JSON file; ValueError naming it when it is not JSON, too large or nested too deeply."""
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"{str(path)!r} is larger than {MAX_JSON_BYTES} bytes; not an index file.")
    try:
        return json.loads(path.read_text())
    except RecursionError:
        raise ValueError(f"{str(path)!r} nests too deeply to be an index file.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON ({exc}).") from exc


def read_ids(path: Path) -> tuple[list, set[int]]:
    """ids and removed rows of ``ids.json``: ids decodable and hashable, live ids unique,
    ``removed`` a list of distinct row numbers in range."""
    stored = read_json(path)
    if not isinstance(stored, dict) or not isinstance(stored.get("ids"), list) or not isinstance(
            stored.get("removed"), list):
        raise ValueError(f"{str(path)!r}: fields 'ids' and 'removed' must be lists.")
    try:
        ids = [decode_id(i) for i in stored["ids"]]
        for i in ids:
            hash(i)
    except (ValueError, TypeError, RecursionError) as exc:
        raise ValueError(f"{str(path)!r}: field 'ids' holds an invalid id ({exc}).") from None
    removed = stored["removed"]
    bad = [r for r in removed if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < len(ids)]
    if bad:
        raise ValueError(f"{str(path)!r}: field 'removed' must list row numbers in [0, {len(ids)}); got {bad[:3]}.")
    if len(set(removed)) != len(removed):
        raise ValueError(f"{str(path)!r}: field 'removed' lists a row twice.")
    removed = set(removed)
    live = [i for r, i in enumerate(ids) if r not in removed]
    if len(set(live)) != len(live):
        raise ValueError(f"{str(path)!r}: field 'ids' holds the same id twice.")
    return ids, removed


def read_matrix(path: Path, rows: int, dim: int) -> np.ndarray:
    """A (rows, dim) float32 ``.npy`` whose header and size are checked before anything is
    allocated (a header may claim terabytes) and whose values must be finite. Object arrays
    (pickles) are refused, never unpickled."""
    expected = (rows, dim)
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"{str(path)!r} is not a plain float array ({exc}).") from exc
        if dtype != np.dtype("<f4") or fortran or shape != expected:
            raise ValueError(f"{str(path)!r} holds {dtype} {shape}; the manifest announces float32 {expected}.")
        size = os.fstat(f.fileno()).st_size
        if size != f.tell() + rows * dim * 4:
            raise ValueError(f"{str(path)!r} is {size} bytes, not the size its header announces: truncated or padded.")
        x = np.fromfile(f, dtype="<f4", count=rows * dim).reshape(expected)
    if not all(np.isfinite(x[s:s + 65536]).all() for s in range(0, rows, 65536)):  # in blocks: no n x d temporary
        raise ValueError(f"{str(path)!r} holds NaN or infinite features; rebuild the index from finite features.")
    return x


def read_whitening(path: Path, announced, dim: int):
    """The ``whitening.PCAWhitening`` saved with an index: a (d,) mean and a (d, dim) projection
    of finite float32, their sizes those the manifest announces (no pickles are read)."""
    from utils_cv.similarity.whitening import PCAWhitening

    if not isinstance(announced, dict) or set(announced) != {"input_dim", "dim"} or announced["dim"] != dim or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in announced.values()):
        raise ValueError(f"{str(path.with_name('manifest.json'))!r}: field 'whitening' must be "
                         f"{{'input_dim': d, 'dim': {dim}}}. Got {announced!r}.")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("mean", "projection")}
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{str(path)!r} is not a whitening saved by this library ({exc}).") from exc
    d = announced["input_dim"]
    if arrays["mean"].shape != (d,) or arrays["projection"].shape != (d, dim) or any(
            a.dtype != np.float32 or not np.isfinite(a).all() for a in arrays.values()):
        raise ValueError(f"{str(path)!r} holds mean {arrays['mean'].shape} and projection "
                         f"{arrays['projection'].shape}; the manifest announces ({d},) and ({d}, {dim}) finite float32.")
    return PCAWhitening.from_arrays(arrays)
