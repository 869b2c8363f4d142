"""A folder of images kept searchable: embed once, then re-embed only what changed.

:func:`index_folder` is what ``utils-cv-similarity index FOLDER --out DIR`` runs. The output
folder holds:

* ``collection.json``: the image folder, the model that made the embeddings, one entry per
  image (path relative to the folder, size, modification time, sha256 of the content, a
  perceptual hash for the duplicate finder, of the definition ``phash_version`` names: hashes
  of an older definition are ignored and recomputed by the next run) and the files that were
  skipped with their reason;
* ``features.npy``: the (n, d) float32 L2-normalised embeddings, rows aligned with the
  entries (a standard format other tools read; ``export_parquet`` writes path + embedding);
* ``index/``: a :class:`~utils_cv.similarity.index.SimilarityIndex` over the same rows, ids
  the relative paths (``SimilarityIndex.load(DIR / "index")`` opens it alone).

A re-run on the same folder with the same model keeps the rows of unchanged files (same
path, size and modification time; when size or time differ, the same sha256 also counts as
unchanged), embeds new and changed files and drops deleted ones, so its result equals a fresh
build. The image folder is only ever read.

Why a folder of three parts rather than the index alone: approximate indexes (IVF-SQ8,
IVF-PQ) keep lossy codes, so incremental updates need the exact embeddings kept beside them.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils_cv.common.download import sha256sum
from utils_cv.common.paths import atomic_write
from utils_cv.similarity import data as data_mod

logger = logging.getLogger(__name__)

__all__ = ["Collection", "IndexReport", "add_perceptual_hashes", "check_folders", "export_parquet", "index_folder",
           "load_embedder", "open_collection", "pick_backend", "write_collection"]

FORMAT = "utils_cv.similarity.collection/1"
DEFAULT_BACKBONE = "efficientnet_lite0"


@dataclass
class IndexReport:
    """What :func:`index_folder` did."""

    out: Path
    total: int
    embedded: int
    reused: int
    removed: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    backend: str = "exact"
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"out": str(self.out), "total": self.total, "embedded": self.embedded, "reused": self.reused,
                "removed": self.removed, "backend": self.backend, "seconds": round(self.seconds, 3),
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped]}


@dataclass
class Collection:
    """An opened collection folder: the index, the embeddings, the entries and the model spec."""

    path: Path
    root: Path
    model: dict
    entries: list[dict]
    features: np.ndarray
    index: object  # SimilarityIndex
    skipped: list[tuple[str, str]]
    created: str

    def abspath(self, rel) -> Path:
        return self.root / str(rel)

    def duplicate_groups(self, threshold: float | None = None, hash_threshold: int | None = None) -> list:
        """Near-duplicate groups of the collection (``dedup.duplicate_groups`` over its features,
        ids the relative paths, with each image's perceptual hash unless ``hash_threshold`` is
        -1), each marked ``exact`` when its files have the same sha256."""
        from utils_cv.similarity import dedup

        hashes = None if hash_threshold == -1 else [  # -1: the embeddings alone
            int(e["phash"], 16) if isinstance(e.get("phash"), str) else None for e in self.entries]
        missing = 0 if hashes is None else sum(h is None for h in hashes)
        if missing:
            logger.warning("%d of the %d images of %s have no perceptual hash (unreadable when indexed, or hashed by "
                           "an older version): they are compared by their features alone; run the same 'index' "
                           "command again to hash them", missing, len(hashes), self.path)
        groups = dedup.duplicate_groups(self.features, [e["path"] for e in self.entries], threshold, hashes=hashes,
                                        hash_threshold=hash_threshold)
        sha = {e["path"]: e["sha256"] for e in self.entries}
        for g in groups:
            g.exact = len({sha[i] for i in g.ids}) == 1
        return groups


def model_spec(model: str | os.PathLike | None = None, backbone: str | None = None,
               weights: str | os.PathLike | None = None) -> dict:
    """What identifies the embedding model: a trained model file (with its sha256) or a
    backbone name (and a weights file)."""
    if model is not None and (backbone is not None or weights is not None):
        raise ValueError("Give either 'model' (a trained model file) or 'backbone' / 'weights', not both.")
    if model is not None:
        path = Path(model).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"Model file {str(path)!r} does not exist; train one with "
                                    "'utils-cv-similarity train FOLDER --out model.pth'.")
        return {"model": str(path), "sha256": sha256sum(path)}
    spec = {"backbone": backbone or DEFAULT_BACKBONE}
    if weights is not None:
        w = Path(weights).expanduser().resolve()
        if not w.is_file():
            raise FileNotFoundError(f"Weights file {str(w)!r} does not exist.")
        spec.update(weights=str(w), sha256=sha256sum(w))
    return spec


def load_embedder(spec: dict):
    """``(module, transform)`` for a model spec from :func:`model_spec`."""
    if "model" in spec:
        from utils_cv.similarity import checkpoint

        return checkpoint.load(spec["model"])
    from utils_cv.similarity import model as model_mod

    return model_mod.create_backbone(spec["backbone"], weights=spec.get("weights"))


def pick_backend(n: int) -> str:
    """The backend ``auto`` picks by collection size, from the measurements of
    ``index_tuning.recommend`` (BENCHMARKS.md): exact search answers in milliseconds up to
    about 100k vectors; beyond, HNSW up to a million, IVF-SQ8 above (a quarter of the memory)."""
    from utils_cv.similarity.distances import faiss_module

    if n <= 100_000 or faiss_module() is None:
        return "exact"
    return "hnsw" if n <= 1_000_000 else "ivfsq"


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable collection file ({exc}); index the folder again "
                         "into a new output folder.") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} was not written by utils_cv (format {FORMAT}).")
    return doc


def open_collection(path: str | os.PathLike) -> Collection:
    """Open a folder written by :func:`index_folder`."""
    from utils_cv.similarity.index import SimilarityIndex

    path = Path(path).expanduser()
    manifest = path / "collection.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"No collection at {str(path)!r} (collection.json is missing); build one with "
                                f"'utils-cv-similarity index FOLDER --out {path}'.")
    doc = _read_json(manifest)
    feats = np.load(path / "features.npy", allow_pickle=False)
    entries = doc["entries"]
    if feats.ndim != 2 or len(feats) != len(entries) or feats.dtype != np.float32:
        raise ValueError(f"{str(path / 'features.npy')!r} holds {feats.dtype} {feats.shape}, not one float32 row for "
                         f"each of the {len(entries)} images of collection.json; index the folder again.")
    index = SimilarityIndex.load(path / "index")
    if index.metadata.get("generation") != doc.get("generation"):
        raise ValueError(f"{str(path)!r}: the index and collection.json come from different runs (interrupted "
                         "run?); run the same 'index' command again to repair it.")
    _drop_stale_hashes(doc, path)
    return Collection(path, Path(doc["root"]), doc["model"], entries, feats, index,
                      [tuple(s) for s in doc.get("skipped", [])], doc.get("created", ""))


def _drop_stale_hashes(doc: dict, path) -> None:
    """Remove from ``doc``'s entries the perceptual hashes of another definition than
    ``dedup.PHASH_VERSION`` (written before it changed): mixed with new ones they would miss
    duplicates. ``index`` recomputes them; until then ``duplicates`` uses the embeddings alone."""
    from utils_cv.similarity.dedup import PHASH_VERSION

    if doc.get("phash_version", 1) == PHASH_VERSION:
        return
    stale = [e for e in doc.get("entries", []) if isinstance(e, dict) and e.pop("phash", None) is not None]
    if stale:
        logger.info("%s: its %d perceptual hashes are of an older definition: not used, and recomputed by the "
                    "next 'index' run", path, len(stale))


def check_folders(folder, out, backend: str = "auto") -> tuple[Path, Path]:
    """``(root, out)`` resolved, after checking the backend name and that the output folder
    does not lie inside the image folder (which is only ever read)."""
    from utils_cv.similarity.index import BACKENDS

    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"The 'backend' parameter must be 'auto' or one of {list(BACKENDS)}. Got {backend!r}.")
    root = Path(folder).expanduser().resolve()
    out = Path(out).expanduser().resolve()
    if out == root or root in out.parents:
        raise ValueError(f"The output folder {str(out)!r} lies inside the image folder {str(root)!r}: choose "
                         "another place (the image folder is only ever read).")
    return root, out


def index_folder(folder: str | os.PathLike, out: str | os.PathLike, model: str | os.PathLike | None = None,
                 backbone: str | None = None, weights: str | os.PathLike | None = None, backend: str = "auto",
                 batch_size: int = 32, progress: bool = True, fast_decode: bool = True, runtime: str = "torch",
                 precision: str = "fp32") -> IndexReport:
    """Embed the images of ``folder`` (plain or one sub-folder per class) and save a searchable
    collection to ``out``; a re-run embeds only new or changed files (see the module doc).

    Bad files never stop the run: they are skipped, logged and listed in the report.
    ``fast_decode``: decode big photos at a reduced scale; ``runtime``, ``precision``: where the
    forward pass runs (see ``FeatureExtractor``). A reduced precision is part of the model's
    identity (its features differ a little), so changing it embeds everything again.
    """
    from utils_cv.similarity.features import FeatureExtractor

    start = time.perf_counter()
    root, out = check_folders(folder, out, backend)
    spec = model_spec(model, backbone, weights)
    from utils_cv.similarity.runtime import check_runtime

    check_runtime(runtime, precision)  # before any work; the exported runtimes run on the CPU, as here
    if precision != "fp32":
        spec["precision"] = precision
    scan = data_mod.scan_images(root, labelled=False)
    skipped = [(str(p), r) for p, r in scan.skipped]
    old_rows: dict[str, tuple[dict, np.ndarray]] = {}
    if (out / "collection.json").is_file():
        try:
            previous = open_collection(out)
        except (ValueError, FileNotFoundError) as exc:
            logger.warning("the previous collection in %s cannot be reused (%s): embedding everything", out, exc)
        else:
            if previous.model != spec:
                logger.warning("the model differs from the one of the previous run: embedding everything again")
            elif previous.root != root:
                logger.warning("the previous collection in %s indexed %s, not %s: embedding everything",
                               out, previous.root, root)
            else:
                old_rows = {e["path"]: (e, previous.features[i]) for i, e in enumerate(previous.entries)}
    entries, vectors, todo = [], [], []
    for p in scan.paths:
        rel = p.relative_to(root).as_posix()
        st = p.stat()
        entry = {"path": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        old = old_rows.get(rel)
        if old is not None and (old[0]["size"], old[0]["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
            entry["sha256"] = old[0]["sha256"]
        else:
            entry["sha256"] = sha256sum(p)
            if old is not None and old[0]["sha256"] != entry["sha256"]:
                old = None
        if old is not None and "phash" in old[0]:
            entry["phash"] = old[0]["phash"]
        entries.append(entry)
        vectors.append(old[1] if old is not None else None)
        if old is None:
            todo.append(len(entries) - 1)
    reused = len(entries) - len(todo)
    removed = len(set(old_rows) - {e["path"] for e in entries})
    if todo:
        module, transform = load_embedder(spec)
        extractor = FeatureExtractor(module, transform, batch_size=batch_size, fast_decode=fast_decode,
                                     runtime=runtime, precision=precision)
        result = extractor.extract([root / entries[i]["path"] for i in todo], on_error="skip", progress=progress,
                                   hashes=True)
        for j, row, h in zip(result.kept, result.features, result.hashes):
            vectors[todo[int(j)]] = row
            if h is not None:
                entries[todo[int(j)]]["phash"] = f"{h:016x}"
        skipped += [(str(item), reason) for item, reason in result.skipped]
    keep = [i for i, v in enumerate(vectors) if v is not None]
    if not keep:
        raise ValueError(f"No image under {str(root)!r} could be embedded ({len(skipped)} skipped; see the log).")
    entries = [entries[i] for i in keep]
    add_perceptual_hashes(root, entries)
    feats = np.ascontiguousarray(np.stack([vectors[i] for i in keep]), dtype=np.float32)
    chosen = write_collection(out, root, spec, entries, feats, skipped, backend)
    report = IndexReport(out, len(entries), len(todo) - (len(vectors) - len(keep)), reused, removed, skipped, chosen,
                         time.perf_counter() - start)
    logger.info("indexed %d images in %s (%d embedded, %d reused, %d removed, %d skipped) with %s in %.1f s",
                report.total, out, report.embedded, reused, removed, len(skipped), chosen, report.seconds)
    return report


def add_perceptual_hashes(root: Path, entries: list[dict], previous: Path | None = None) -> None:
    """Give each entry without one its perceptual hash (``phash``, 16 hex digits; see
    ``dedup.perceptual_hash``), which ``duplicates`` uses beside the embeddings. ``index_folder``
    gets them from its feature extraction; this decodes again, for entries of older runs and
    for the Ray path, except for files unchanged (path, size, time, sha256) since the collection
    in ``previous``, whose hash is reused."""
    from utils_cv.similarity.dedup import perceptual_hash

    known = {}
    if previous is not None and (Path(previous) / "collection.json").is_file():
        try:
            doc = _read_json(Path(previous) / "collection.json")
            _drop_stale_hashes(doc, previous)
            if Path(doc["root"]) == root:
                known = {(e["path"], e["size"], e["mtime_ns"], e["sha256"]): e["phash"] for e in doc["entries"]
                         if isinstance(e.get("phash"), str)}
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("hashes of the previous collection in %s are not reused: %s", previous, exc)
    for e in entries:
        old = known.get((e["path"], e["size"], e["mtime_ns"], e["sha256"]))
        if "phash" not in e and old is not None:
            e["phash"] = old
        if "phash" not in e:
            try:
                e["phash"] = f"{perceptual_hash(root / e['path']):016x}"
            except Exception as exc:  # noqa: BLE001 - embedded, so readable: a file changed meanwhile
                logger.warning("no perceptual hash for %s: %s", e["path"], exc)


def write_collection(out: Path, root: Path, spec: dict, entries: list[dict], feats: np.ndarray,
                     skipped: list, backend: str = "auto") -> str:
    """Write a collection folder (see the module doc) from its parts; returns the backend used.
    The embeddings and the index are written first, ``collection.json`` last, and all three
    carry one generation token, so :func:`open_collection` refuses a mix of two runs."""
    from utils_cv.similarity.dedup import PHASH_VERSION
    from utils_cv.similarity.index import SimilarityIndex

    chosen = pick_backend(len(feats)) if backend == "auto" else backend
    generation = f"{time.time_ns():x}-{os.getpid()}"
    metadata = {"generation": generation, "model": spec, "root": str(root)}
    index = SimilarityIndex.build(feats, [e["path"] for e in entries], backend=chosen, metadata=metadata)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "features.npy") as f:
        np.save(f, feats)
    index.save(out / "index")
    doc = {"format": FORMAT, "generation": generation, "root": str(root), "model": spec,
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "backend": chosen, "dim": int(feats.shape[1]),
           "phash_version": PHASH_VERSION, "entries": entries, "skipped": [list(x) for x in skipped]}
    with atomic_write(out / "collection.json", "w") as f:
        json.dump(doc, f, indent=0)
    return chosen


def export_parquet(collection: Collection, dest: str | os.PathLike) -> Path:
    """Write ``path`` (absolute), ``path_bytes`` (the same as the file system's bytes) and
    ``embedding`` (float32 list) rows to a parquet file for other tools (needs pyarrow)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("Exporting to parquet needs pyarrow: pip install pyarrow.") from exc
    dest = Path(dest)
    dim = collection.features.shape[1]
    paths = [str(collection.abspath(e["path"])) for e in collection.entries]
    table = pa.table({
        # parquet strings are UTF-8: a name that is not is escaped there, exact in path_bytes
        "path": [p.encode("utf-8", "backslashreplace").decode("utf-8") for p in paths],
        "path_bytes": pa.array([os.fsencode(p) for p in paths], pa.binary()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(collection.features.ravel(), pa.float32()), dim),
    })
    with atomic_write(dest) as f:
        pq.write_table(table, f)
    return dest
