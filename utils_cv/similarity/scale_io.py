"""Where embedding shards come from and go to: image sources, parquet shard files.

Paths are local or URIs that pyarrow's filesystems open (``s3://``, ``gs://``, ``hdfs://``).
A shard is one parquet file with columns ``path`` (string), ``embedding`` (fixed-size list of
float32, null where the image failed), ``model`` (string) and ``error`` (string, null when the
image was embedded), in the order of the images. Nothing here needs Ray; only the decoding
used by Ray's decode tasks (``decode_batch``) imports torch, when called.
"""
from __future__ import annotations

import glob as globlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["FORMAT", "decode_batch", "existing_files", "filesystem", "is_uri", "iter_shards", "list_shards", "list_source",
           "load_embeddings", "pixels", "shard_table", "write_shard"]

FORMAT = "utils_cv.similarity.shards/1"
_TABLE_SUFFIXES = (".parquet", ".csv")


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow ships with the 'scale' extra
        raise ImportError("Reading embedding shards needs pyarrow: pip install 'utils_cv[scale]'.") from exc
    return pafs, pq


def is_uri(path) -> bool:
    """True for ``scheme://...`` locations (s3://, gs://, ...) opened through pyarrow's filesystems."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def filesystem(path) -> tuple[object, str]:
    """``(pyarrow filesystem, path inside it)`` for a local path or a URI."""
    pafs, _ = _pyarrow()
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(str(path).removeprefix("file://")).expanduser().resolve())


def list_shards(shards) -> list[str]:
    """The parquet shard files of ``shards``: a folder written by ``scale.embed`` (its
    ``part-*.parquet`` files in name order, i.e. in the order of the images), or a list of files."""
    if isinstance(shards, (str, os.PathLike)):
        pafs, _ = _pyarrow()
        fs, root = filesystem(os.fspath(shards))
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            return [os.fspath(shards)]
        if info.type != pafs.FileType.Directory:
            raise FileNotFoundError(f"No embedding shards at {str(shards)!r}: run scale.embed(source, "
                                    f"{str(shards)!r}) first.")
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
        prefix = os.fspath(shards).split("://")[0] + "://" if is_uri(os.fspath(shards)) else ""
        found = sorted(prefix + i.path for i in infos
                       if i.type == pafs.FileType.File and i.base_name.startswith("part-")
                       and i.base_name.endswith(".parquet"))
        if not found:
            raise FileNotFoundError(f"{str(shards)!r} holds no part-*.parquet shard: run scale.embed first.")
        return found
    found = [os.fspath(s) for s in shards]
    if not found:
        raise ValueError("The 'shards' parameter is empty: give a folder of shards or a list of parquet files.")
    return found


def read_columns(shard: str, columns: list[str]):
    """The shard's ``columns`` that exist (``error`` may be missing: then no row failed) and its
    error per row (None: embedded)."""
    _, pq = _pyarrow()
    fs, inner = filesystem(shard)
    try:
        names = pq.read_schema(inner, filesystem=fs).names
        missing = [c for c in columns if c not in names and c != "error"]
        if missing:
            raise KeyError(f"no column {missing}")
        table = pq.read_table(inner, filesystem=fs, columns=[c for c in columns if c in names])
    except (OSError, KeyError) as exc:
        raise ValueError(f"{shard!r} is not a readable embedding shard ({exc}); embed it again.") from exc
    errors = table.column("error").to_pylist() if "error" in table.column_names else [None] * table.num_rows
    return table, errors


def _matrix(column, shard: str) -> np.ndarray:
    """An (n, d) float32 array from a list column of equal-length rows (no nulls)."""
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(column) == 0:
        return np.empty((0, 0), np.float32)
    values = column.flatten().to_numpy(zero_copy_only=False)
    d, rem = divmod(len(values), len(column))
    if rem or (pa.types.is_list(column.type) and len(set(column.value_lengths().to_pylist())) > 1):
        raise ValueError(f"{shard!r}: the embeddings do not all have the same length.")
    return np.ascontiguousarray(values.reshape(len(column), d), dtype=np.float32)


def iter_shards(shards) -> Iterator[tuple[list[str], np.ndarray, list[tuple[str, str]]]]:
    """``(paths, features (n, d) float32, errors [(path, reason)])`` of each shard in turn: the
    rows that were embedded, then those that failed (left out of ``paths`` and ``features``)."""
    for shard in list_shards(shards):
        table, errors = read_columns(shard, ["path", "embedding", "error"])
        ok = np.array([e is None or e == "" for e in errors], dtype=bool)
        paths = table.column("path").to_pylist()
        failed = [(p, e) for p, e, good in zip(paths, errors, ok) if not good]
        kept = table.filter(ok) if not ok.all() else table
        yield [p for p, good in zip(paths, ok) if good], _matrix(kept.column("embedding"), shard), failed


def load_embeddings(shards) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """All shards in memory: ``(paths, features (n, d) float32, errors)``; for collections
    that fit in memory (features of 1M images at d=1280 take 5 GB)."""
    paths, blocks, errors = [], [], []
    for p, x, e in iter_shards(shards):
        paths += p
        errors += e
        if len(x):
            blocks.append(x)
    dims = {b.shape[1] for b in blocks}
    if len(dims) > 1:
        raise ValueError(f"The shards hold embeddings of different widths {sorted(dims)}: they come from different "
                         "models; embed them again with one model.")
    feats = np.concatenate(blocks) if blocks else np.empty((0, 0), np.float32)
    return paths, feats, errors



# ---------------------------------------------------------------------------- sources
def _local_listing(paths) -> list[tuple[str, tuple | None]]:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((str(p), (st.st_size, st.st_mtime_ns)))
        except OSError:
            out.append((str(p), None))  # listed, unreadable: becomes an error row
    return out


def _read_table_paths(source: str) -> list[str]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, inner = filesystem(source)
    table = (pq.read_table(inner, filesystem=fs) if source.lower().endswith(".parquet")
             else pacsv.read_csv(fs.open_input_stream(inner)))
    if "path" not in table.column_names and table.num_columns != 1:
        raise ValueError(f"{source!r} must have a 'path' column (or a single column) of image paths or URIs; it has "
                         f"{table.column_names}.")
    paths = [str(p) for p in table.column("path" if "path" in table.column_names else 0).to_pylist()]
    base = None if is_uri(source) else Path(inner).parent
    return [p if is_uri(p) or base is None else str((base / p).resolve()) for p in paths]


def list_source(source) -> list[tuple[str, tuple | None]]:
    """The images of ``source`` in a stable order, as ``(path or URI, (size, mtime) or None)``.

    Args:
        source: a folder (every file with an image extension below it, as
            ``data.scan_images(check=False)`` lists them, name order); a glob pattern (``**``
            recursive, sorted); a ``.parquet`` / ``.csv`` file with a ``path`` column (relative
            paths are taken from the file's folder; kept in file order); or a list of paths (kept
            in order). Folders, globs and tables may be URIs (``s3://bucket/photos/``).
    """
    if not isinstance(source, (str, os.PathLike)):
        paths = [os.fspath(p) for p in source]
        if not paths:
            raise ValueError("The 'source' parameter is an empty list: give at least one image.")
        listing = [(p, None) if is_uri(p) else (str(Path(p).expanduser().resolve()), None) for p in paths]
    else:
        text = os.fspath(source)
        if text.lower().endswith(_TABLE_SUFFIXES):
            listing = [(p, None) for p in _read_table_paths(text)]
        elif any(c in text for c in "*?["):
            listing = _remote_listing(text, glob=True) if is_uri(text) else _local_listing(
                sorted(str(Path(p).resolve()) for p in globlib.glob(os.path.expanduser(text), recursive=True)
                       if os.path.isfile(p)))
        elif is_uri(text):
            listing = _remote_listing(text, glob=False)
        else:
            from utils_cv.similarity.data import scan_images

            root = Path(text).expanduser().resolve()
            listing = _local_listing(scan_images(root, check=False, labelled=False).paths)
    if not listing:
        raise ValueError(f"The 'source' parameter {source!r} names no image.")
    seen: set[str] = set()
    twice = [p for p, _ in listing if p in seen or seen.add(p)]
    if twice:
        raise ValueError(f"The 'source' parameter lists {len(twice)} path(s) twice, e.g. {twice[0]!r}: each image "
                         "must appear once (its path is its id).")
    return listing


def _remote_listing(uri: str, glob: bool) -> list[tuple[str, tuple | None]]:
    import fnmatch

    import pyarrow.fs as pafs

    from utils_cv.similarity.data import IMAGE_EXTENSIONS

    scheme, rest = uri.split("://", 1)
    base = rest.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0] if glob else rest.rstrip("/")
    fs, root = pafs.FileSystem.from_uri(f"{scheme}://{base}")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    keep = [i for i in infos if i.type == pafs.FileType.File and (
        fnmatch.fnmatch(i.path, rest) if glob else i.base_name.lower().endswith(IMAGE_EXTENSIONS))]
    return [(f"{scheme}://{i.path}", (i.size, i.mtime_ns)) for i in sorted(keep, key=lambda i: i.path)]


# ---------------------------------------------------------------------------- shards out
def existing_files(output: str) -> set[str]:
    import pyarrow.fs as pafs

    fs, root = filesystem(output)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return {i.base_name for i in infos if i.type == pafs.FileType.File}


def write_shard(output: str, name: str, table) -> None:
    """A shard written whole or not at all: a temporary file renamed into place locally; on an
    object store the upload itself is atomic (an object appears only once complete)."""
    import pyarrow.parquet as pq

    from utils_cv.common.paths import atomic_write

    fs, root = filesystem(output)
    if is_uri(output):
        with fs.open_output_stream(f"{root.rstrip('/')}/{name}") as f:
            pq.write_table(table, f)
    else:
        with atomic_write(Path(root) / name) as f:
            pq.write_table(table, f)


def shard_table(parts: list[dict], model_name: str, spec: dict, dim: int):
    import pyarrow as pa

    pos = np.concatenate([p["pos"] for p in parts])
    order = np.argsort(pos, kind="stable")
    paths = np.concatenate([np.asarray(p["path"], dtype=object) for p in parts])[order]
    errors = np.concatenate([np.asarray(p["error"], dtype=object) for p in parts])[order]
    emb = np.concatenate([np.asarray(p["embedding"], np.float32).reshape(len(p["pos"]), -1) for p in parts])[order]
    failed = np.array([e != "" for e in errors], bool)
    table = pa.table({
        "path": pa.array([str(p) for p in paths], pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), pa.float32()), dim,
                                                      mask=pa.array(failed)),
        "model": pa.array([model_name] * len(paths), pa.string()),
        "error": pa.array([str(e) if f else None for e, f in zip(errors, failed)], pa.string()),
    })
    return table.replace_schema_metadata({"utils_cv": json.dumps({"format": FORMAT, "model": spec})})


# ---------------------------------------------------------------------------- decoding
def pixels(path: str, transform) -> np.ndarray:
    """The model's input for one image: the preprocessing of FeatureExtractor (to_rgb_image,
    then the transform); URIs are read through pyarrow and decoded from memory."""
    from PIL import Image

    from utils_cv.similarity.features import to_rgb_image

    if is_uri(path):
        fs, inner = filesystem(path)
        with fs.open_input_file(inner) as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            image = to_rgb_image(im)
    else:
        image = to_rgb_image(path)
    return np.asarray(transform(image), dtype=np.float32)


def decode_batch(batch: dict, transform) -> dict:
    """A Ray Data batch of paths -> the same rows with ``pixels`` (the model's input) and
    ``error`` (empty, or why the file could not be read)."""
    from PIL import Image

    arrays, errors = [], []
    for p in batch["path"]:
        try:
            arrays.append(pixels(str(p), transform))
            errors.append("")
        except Exception as exc:  # noqa: BLE001 - the file becomes a row with its error
            arrays.append(None)
            errors.append(f"Could not decode image {str(p)!r}: {type(exc).__name__}: {exc}")
    shape = next((a.shape for a in arrays if a is not None), None)
    if shape is None:
        shape = np.asarray(transform(Image.new("RGB", (256, 256))), dtype=np.float32).shape
    out = np.zeros((len(arrays), *shape), np.float32)
    for i, a in enumerate(arrays):
        if a is not None and a.shape == shape:
            out[i] = a
        elif a is not None:
            errors[i] = f"the transform gave shape {a.shape}, not {shape} as for the other images"
    return {"path": batch["path"], "pos": batch["pos"], "pixels": out, "error": np.array(errors, dtype=object)}
