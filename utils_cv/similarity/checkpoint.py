"""Save and load a trained embedding model: one weights file that carries its own metadata.

File format (``FORMAT``): ``torch.save`` of ``{"format", "metadata" (a JSON string),
"state_dict"}``, readable with ``torch.load(..., weights_only=True)`` (no pickled code runs).
The metadata (backbone, head, classes, image size, preprocessing, library versions, the shape
of every tensor, the training log) lives INSIDE the weights file, so the file alone rebuilds the
model and a metadata / weights mismatch is caught at load. ``<path>.json`` is a convenience copy
for people and tools, written first; :func:`load` never reads it, so a save interrupted between
the two files cannot leave a pair that loads wrongly.

Writes are atomic (a temporary file in the same folder, fsynced, renamed into place). A writer
holds an advisory lock (``flock``) on its temporary file while writing, so the next save of the
same path removes temporaries left by killed saves (unlocked) and leaves those of live writers
alone. A full disk is reported as such (``OSError`` with ``errno.ENOSPC``, or ``EDQUOT`` /
``EFBIG`` for a quota or a file-size limit), naming the file and the size needed; the previous
model file is then unchanged.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import glob
import io
import json
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from utils_cv.common.paths import target_mode
from utils_cv.common.versions import library_versions
from utils_cv.similarity import model as model_mod
from utils_cv.similarity.heads import HEADS, EmbeddingModel, SimilarityNet

try:  # POSIX advisory locks; elsewhere stale temporaries are left for the user to remove
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

__all__ = ["FORMAT", "load", "save"]

FORMAT = "utils_cv.similarity/1"
_NOT_IN_CONFIG = ("format", "versions", "tensors", "training_log")
_FULL = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file is larger than the file system or a size limit "
         "allows"}
if hasattr(errno, "EDQUOT"):
    _FULL[errno.EDQUOT] = "the disk quota is exceeded"


# ---------------------------------------------------------------------------- saving
def _network(obj) -> SimilarityNet:
    for candidate in (obj, getattr(obj, "model", None), getattr(obj, "net", None)):
        if isinstance(candidate, SimilarityNet):
            return candidate
    raise TypeError("save needs a Learner from train.create_learner, its SimilarityNet, or the module "
                    f"train.embedding_model / checkpoint.load returned; got {type(obj).__name__}.")


def _training_log(obj) -> list[dict] | None:
    """The per-epoch log of a Learner's retrieval validation callback (it exposes ``history``)."""
    for cb in getattr(obj, "cbs", ()) or ():
        history = getattr(cb, "history", None)
        if isinstance(history, list) and history:
            return [dict(h) for h in history]
    return None


def save(learner_or_net, path: str | os.PathLike, log: list[dict] | None = None) -> Path:
    """Save weights + metadata in one file (atomically), the metadata also as ``<path>.json``.

    Args:
        learner_or_net: a Learner from ``train.create_learner``, its ``SimilarityNet``, or the
            module ``train.embedding_model`` / :func:`load` returned.
        path: the model file (its folder is created).
        log: the training log to store; None takes the Learner's retrieval validation log.

    Returns:
        ``path``.

    Raises:
        IsADirectoryError / ValueError: ``path`` is a folder or not a regular file (nothing
            is replaced).
        OSError: the disk is full (``errno.ENOSPC``), a quota or a size limit is reached.
    """
    path = Path(path)
    net = _network(learner_or_net)
    config = dict(net.config)
    if not config:
        raise ValueError("save needs a network built by train.create_learner or checkpoint.load (its config is empty).")
    json_path = path.with_name(path.name + ".json")
    for target in (path, json_path):
        _refuse_non_file(target, "save to")
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {"format": FORMAT, **config, "versions": library_versions("torch", "timm", "fastai"),
            "tensors": {k: list(v.shape) for k, v in state.items()}}
    log = _training_log(learner_or_net) if log is None else [dict(e) for e in log]
    if log:
        meta["training_log"] = log
    text = json.dumps(meta, indent=1, default=str)
    buffer = io.BytesIO()  # serialised in memory: torch's writer hides a failed write behind "unexpected pos"
    torch.save({"format": FORMAT, "metadata": text, "state_dict": state}, buffer)
    data = buffer.getbuffer()
    for target in (path, json_path):
        remove_stale_temporaries(target)
    _write_atomically(json_path, text.encode("utf-8"))  # the convenience copy first
    _write_atomically(path, data)
    return path


def _refuse_non_file(path: Path, action: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, f"Cannot {action} {str(path)!r}: it is a folder; give a file path "
                                f"such as {str(path / 'model.pth')!r}.")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"Cannot {action} {str(path)!r}: it is a {_kind(st.st_mode)}, not a regular file.")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "folder")):
        if test(mode):
            return name
    return "special file"


def _lock(fd: int, block: bool) -> bool:
    if fcntl is None:  # pragma: no cover - Windows
        return block
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


def _temporary(path: Path) -> tuple[int, str]:
    """A new locked temporary file beside ``path``: ``(fd, name)``."""
    while True:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        _lock(fd, block=True)
        try:  # a concurrent cleaner may have removed it between its creation and the lock
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return fd, tmp
        except FileNotFoundError:
            pass
        os.close(fd)


def _write_atomically(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:  # closing it releases the lock, after the rename
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.chmod(tmp, target_mode(path))  # mkstemp makes 0600; keep what a plain write would give
            os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in _FULL:
            raise OSError(exc.errno, f"Cannot save {str(path)!r}: {_FULL[exc.errno]} ({len(data) / 1e6:.1f} MB "
                                     "to write). Free some space or save elsewhere; the previous file at that path "
                                     "is unchanged.") from exc
        raise


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed saves of ``path`` left beside it (those no live
    writer holds locked); returns what was removed."""
    path = Path(path)
    removed = []
    if fcntl is None or not path.parent.is_dir():  # pragma: no cover - Windows
        return removed
    for name in glob.glob(os.path.join(glob.escape(str(path.parent)), f".{glob.escape(path.name)}.*.tmp")):
        try:
            if not stat.S_ISREG(os.lstat(name).st_mode):
                continue
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if _lock(fd, block=False) and os.lstat(name).st_ino == os.fstat(fd).st_ino:
                os.unlink(name)
                removed.append(Path(name))
        except OSError:
            continue
        finally:
            os.close(fd)
    if removed:
        logger.info("removed %d temporary file(s) left by interrupted saves of %s", len(removed), path)
    return removed


# ---------------------------------------------------------------------------- loading
def _open_model_file(path: Path):
    """Open ``path`` for reading without blocking on a FIFO; only a regular file is accepted."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        broken = " (a link to a missing file)" if os.path.islink(path) else ""
        raise FileNotFoundError(errno.ENOENT, f"Model file {str(path)!r} does not exist{broken}.") from None
    except IsADirectoryError:  # pragma: no cover - platforms that refuse to open folders
        fd = None
    st = os.fstat(fd) if fd is not None else os.stat(path)
    if stat.S_ISREG(st.st_mode):
        return os.fdopen(fd, "rb")
    if fd is not None:
        os.close(fd)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, f"Model path {str(path)!r} is a folder, not a model file: pass the "
                                "file that checkpoint.save wrote (e.g. model.pth inside it).")
    raise ValueError(f"Model path {str(path)!r} is a {_kind(st.st_mode)}, not a regular file: pass the file that "
                     "checkpoint.save wrote.")


def _check(ok: bool, path: Path, what: str) -> None:
    if not ok:
        raise ValueError(f"{str(path)!r}: {what}")


def _read(path: Path) -> tuple[dict, dict]:
    """(metadata, state dict) of a model file, checked."""
    with _open_model_file(path) as f:
        try:
            blob = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - corrupted or not a torch file, or unsafe pickle
            raise ValueError(f"{str(path)!r} is not a readable model file ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or "metadata" not in blob or "state_dict" not in blob:
        raise ValueError(f"{str(path)!r} was not written by utils_cv.similarity.checkpoint.save (format {FORMAT}).")
    state = blob["state_dict"]
    tensors = isinstance(state, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())
    _check(tensors, path, f"its state_dict is a {type(state).__name__}, not a mapping of tensor names to tensors.")
    _check(isinstance(blob["metadata"], str), path, "its metadata is not a JSON text.")
    try:
        meta = json.loads(blob["metadata"])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r}: its metadata is not valid JSON ({exc}).") from exc
    _check(isinstance(meta, dict), path, f"its metadata is a JSON {_json_kind(meta)}, not an object.")
    declared = meta.get("tensors")
    _check(isinstance(declared, dict), path, "its metadata lacks the 'tensors' table of the weights' shapes.")
    actual = {k: list(v.shape) for k, v in state.items()}
    if declared != actual:
        diff = sorted(k for k in set(declared) | set(actual) if declared.get(k) != actual.get(k))
        raise ValueError(f"{str(path)!r}: its weights do not match its metadata (differences in {diff[:5]}).")
    for key, kind, ok in (("backbone", "a name", lambda v: isinstance(v, str) and v),
                          ("head", "a name", lambda v: isinstance(v, str) and v),
                          ("classes", "a non-empty list of names",
                           lambda v: isinstance(v, list) and v and all(isinstance(c, str) for c in v)),
                          ("image_size", "an integer >= 16", lambda v: _is_int(v) and v >= 16),
                          ("embedding_dim", "a positive integer", lambda v: _is_int(v) and v > 0)):
        _check(key in meta, path, f"metadata lacks {key!r}.")
        _check(bool(ok(meta[key])), path, f"metadata field {key!r} must be {kind}; got {meta[key]!r}.")
    temperature = meta.get("temperature", 0.05)
    _check(isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0, path,
           f"metadata field 'temperature' must be a positive number; got {temperature!r}.")
    for key in ("ensemble_weight", "score_weight"):
        weight = meta.get(key, 0.0)
        _check(isinstance(weight, (int, float)) and not isinstance(weight, bool) and 0.0 <= weight <= 1.0, path,
               f"metadata field {key!r} must be a number in [0, 1]; got {weight!r}.")
    _check(meta["head"] in HEADS, path, f"its head {meta['head']!r} is not registered (known: {sorted(HEADS)}); "
           "register it with heads.register_head before loading.")
    return meta, state


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_kind(value) -> str:
    return {list: "list", type(None): "null", str: "string", bool: "boolean", int: "number",
            float: "number"}.get(type(value), type(value).__name__)


def load(path: str | os.PathLike) -> tuple[nn.Module, Callable]:
    """Rebuild a saved model: ``(module, transform)`` ready for ``features.extract_features``.

    ``module.metadata`` is the file's metadata; ``module.net`` the whole ``SimilarityNet``.

    Raises:
        FileNotFoundError: no such file.
        IsADirectoryError: ``path`` is a folder.
        ValueError: not a regular file (a FIFO, a device), not a file written by :func:`save`,
            or its metadata does not match its weights (names, shapes, types or classes); the
            message names the file and what differs.
    """
    path = Path(path)
    meta, state = _read(path)
    try:
        body, transform = model_mod.create_backbone(meta["backbone"], pretrained=False, image_size=meta["image_size"])
    except ValueError as exc:
        raise ValueError(f"{str(path)!r}: its backbone cannot be built ({exc}).") from exc
    config = {k: v for k, v in meta.items() if k not in _NOT_IN_CONFIG}
    net = SimilarityNet(body, len(meta["classes"]), head=meta["head"], embedding_dim=meta["embedding_dim"],
                        temperature=meta.get("temperature", 0.05), transform=transform, config=config)
    if meta.get("score_weight", 0.0) > 0.0:  # robust.class_scores: class scores in the embedding
        net.set_score_weight(meta["score_weight"])
    if meta.get("ensemble_weight", 0.0) > 0.0:  # robust.output_ensemble: the starting network, saved beside
        net.set_reference(copy.deepcopy(body), meta["ensemble_weight"])
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{str(path)!r}: its weights do not fit a {meta['backbone']} / {meta['head']} model "
                         f"({exc}).") from exc
    module = EmbeddingModel(net).eval()
    module.metadata = meta
    return module, transform
