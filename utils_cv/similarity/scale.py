"""Embedding collections too large for one process, on Ray (``pip install 'utils_cv[scale]'``).

:func:`embed` lists the images of a source (a folder, a glob, a list, or a parquet / CSV file of
paths; local paths or URIs that pyarrow's filesystems open: ``s3://``, ``gs://``), cuts the
list into shards of ``shard_size`` images, and runs the pending shards through Ray Data: a pool
of actors each holding the model once reads, decodes and embeds batches of paths with
:class:`~utils_cv.similarity.features.FeatureExtractor`, as one process does (CPU workers), or,
with GPU actors (``num_gpus_per_worker > 0``), tasks read and decode in parallel and feed the
actors decoded batches (``decode=``); the driver writes each finished shard as one
parquet file (``path``, ``embedding`` float32 list, ``model``, ``error``) through a temporary
file renamed into place. A file that cannot be read becomes a row with an ``error``, never a
failed job. A re-run skips the shards whose file exists: a shard's name holds a digest of its
paths (with size and modification time when listed from a folder or a glob) and of the model,
so a changed file or model gives a new shard name and only that shard is embedded again.

Why the driver writes the shards rather than the actors: a shard is complete only when all of
its rows are, and the rows of one shard are spread over many actors; the driver sees them in
order (``preserve_order``) and so holds at most about one shard of embeddings (a 10,000-image
shard of d=1280 is 51 MB). The embeddings then cross the network once, to the driver (5 KB an
image; see docs/scaling.md for when that becomes the limit).

:func:`index_folder_ray` is ``utils-cv-similarity index FOLDER --engine ray``: the same output
folder as :func:`utils_cv.similarity.collection.index_folder` (collection.json, features.npy,
index/), plus the shards in ``shards/`` so that an interrupted run resumes.
Indexes built shard by shard: :mod:`utils_cv.similarity.scale_index`.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils_cv.similarity.scale_index import ShardedIndex, build_index
from utils_cv.similarity.scale_io import (decode_batch, existing_files, filesystem, is_uri, list_source,
                                           load_embeddings, shard_table, write_shard)

logger = logging.getLogger(__name__)

_SHARD_STRIDE = 10_000_000  # a row's position: shard * _SHARD_STRIDE + its place in the shard

__all__ = ["EmbedReport", "ShardedIndex", "build_index", "embed", "index_folder_ray", "list_source",
           "load_embeddings"]



@dataclass
class EmbedReport:
    """What :func:`embed` did: ``shards`` all shard files in order, ``written`` / ``reused`` how
    many were embedded now / found complete, ``rows`` images in all, ``embedded`` images processed
    now, ``errors`` (path, reason) of those that failed now."""

    output: str
    shards: list[str]
    written: int
    reused: int
    rows: int
    embedded: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------------------- model
def _model_spec(model, backbone: str | None, weights, transform) -> tuple[dict, object]:
    """``(spec, payload)``: spec identifies the model (saved with every shard); payload is what
    actors build it from (None: ``collection.load_embedder(spec)``)."""
    from torch import nn

    if isinstance(model, nn.Module):
        if not callable(transform):
            raise ValueError("A model given as a torch module needs its preprocessing: pass transform= (the second "
                             "item of model.create_backbone / checkpoint.load).")
        h = hashlib.sha256()
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        spec = {"module": type(model).__name__, "sha256": h.hexdigest()}
        return spec, (model, transform)
    from utils_cv.similarity.collection import model_spec

    spec = model_spec(model, None if model is not None else backbone, weights)
    return spec, None


def _model_name(spec: dict) -> str:
    name = spec.get("backbone") or f"{Path(spec.get('model', spec.get('module', 'model'))).name}@{spec['sha256'][:12]}"
    return name


def _build(spec: dict, payload):
    if payload is not None:
        return payload
    from utils_cv.similarity.collection import load_embedder

    return load_embedder(spec)


# ---------------------------------------------------------------------------- Ray stages
class _Embedder:
    """A Ray Data actor: builds the model once, then embeds batches. Batches with ``pixels``
    were decoded by tasks; batches of paths are read and decoded here, by
    ``FeatureExtractor.extract``: the pipeline of one process, file for file."""

    def __init__(self, spec: dict, payload, use_gpu: bool, threads: int, chunk_size: int | None):
        import torch
        from PIL import Image

        from utils_cv.similarity.features import FeatureExtractor

        module, transform = _build(spec, payload)
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if device.type == "cpu":
            torch.set_num_threads(max(1, threads))
        # FeatureExtractor's prepared copy and forward pass: the same features as one process
        self.extractor = FeatureExtractor(module, transform, device=device, chunk_size=chunk_size, num_workers=0)
        probe = np.asarray(transform(Image.new("RGB", (64, 64))), np.float32)[None]
        self.dim = self.extractor.embed_batch(probe).shape[1]  # a batch of failures still has width d

    def __call__(self, batch: dict) -> dict:
        if "pixels" not in batch:
            return self._read_and_embed(batch)
        ok = np.array([e == "" for e in batch["error"]], bool)
        emb = np.zeros((len(ok), self.dim), np.float32)
        if ok.any():
            emb[ok] = self.extractor.embed_batch(batch["pixels"][ok])
        return {"path": batch["path"], "pos": batch["pos"], "error": batch["error"], "embedding": emb}

    def _read_and_embed(self, batch: dict) -> dict:
        from PIL import Image

        paths = [str(p) for p in batch["path"]]
        errors = [""] * len(paths)
        items, where = [], []
        for i, p in enumerate(paths):
            try:
                if is_uri(p):  # read through pyarrow, decoded from memory
                    fs, inner = filesystem(p)
                    with fs.open_input_file(inner) as f:
                        items.append(Image.open(io.BytesIO(f.read())))
                else:
                    items.append(p)
                where.append(i)
            except Exception as exc:  # noqa: BLE001 - the file becomes a row with its error
                errors[i] = f"Could not decode image {p!r}: {type(exc).__name__}: {exc}"
        emb = np.zeros((len(paths), self.dim), np.float32)
        if items:
            got = self.extractor.extract(items, on_error="skip", progress=False)
            if len(got.kept):  # a batch where everything failed has no rows to place
                emb[np.asarray(where)[got.kept]] = got.features
            failed = sorted(set(range(len(items))) - set(got.kept.tolist()))  # skipped lists them in this order
            for j, (_, why) in zip(failed, got.skipped):
                errors[where[j]] = why.replace(repr(f"item {j}"), repr(paths[where[j]]))  # URIs: name the file
        return {"path": batch["path"], "pos": batch["pos"], "error": np.array(errors, dtype=object),
                "embedding": emb}


@contextlib.contextmanager
def _ray_session(address: str | None):
    """Ray connected to ``address`` (None: the running session, else a local one). A session
    started here is shut down on the way out, so the caller's process is left as it was."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError("The Ray engine needs Ray Data: pip install 'utils_cv[scale]' (ray[data], pyarrow).") from exc
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    elif address not in (None, "auto"):
        logger.warning("Ray is already initialised in this process; address=%r is ignored", address)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------- shards
def _plan(listing, spec: dict, shard_size: int) -> list[tuple[str, list]]:
    """``(file name, items)`` per shard; the name changes with the paths, their size and time, or the model."""
    key = json.dumps(spec, sort_keys=True)
    plan = []
    for i, start in enumerate(range(0, len(listing), shard_size)):
        items = listing[start:start + shard_size]
        h = hashlib.sha256(key.encode())
        for path, stamp in items:
            h.update(f"{path}\t{stamp}\n".encode("utf-8", "surrogateescape"))
        plan.append((f"part-{i:05d}-{h.hexdigest()[:12]}.parquet", items))
    return plan


def embed(source, output, model=None, backbone: str = "efficientnet_lite0", transform=None, weights=None,
          batch_size: int = 32, num_cpus_per_worker: float | None = None, num_gpus_per_worker: float = 0,
          concurrency: int | tuple[int, int] | None = None, address: str | None = None, shard_size: int = 10_000,
          chunk_size: int | None = None, progress: bool = True, decode: str = "auto") -> EmbedReport:
    """Embed every image of ``source`` on Ray into parquet shards in ``output`` (see the module doc).

    Args:
        source: a folder, a glob, a list of paths, or a parquet / CSV file of paths (local or
            URIs); see :func:`list_source`.
        output: a folder (local or a URI); holds ``part-NNNNN-<digest>.parquet`` files.
        model: None (use ``backbone``), a model file from ``checkpoint.save`` / ``train.save``, or
            a torch module (then ``transform`` is required).
        backbone, weights: as in ``model.create_backbone`` when ``model`` is None.
        batch_size: images per batch given to an actor.
        num_cpus_per_worker, num_gpus_per_worker: what each model actor reserves; with GPUs the
            actors run the model on their GPU. ``num_cpus_per_worker`` None: 1 with decode
            tasks, else the CPUs of the largest node up to 4 (the actor's torch threads).
        concurrency: model actors (an int, or (min, max) to let Ray scale the pool); None: one
            per GPU (``num_gpus_per_worker > 0``) or one per ``num_cpus_per_worker`` CPUs of the
            cluster (with decode tasks, less a quarter of the CPUs left to them).
        address: the Ray cluster (``"auto"``, ``"ray://head:10001"``); None: the session already
            initialised in this process, else a local one (shut down again at the end).
        shard_size: images per shard: the unit that is written atomically and skipped on a re-run.
        chunk_size: images per forward call; None: 4 on the CPU, the batch on a GPU.
        decode: where images are read and decoded. ``"actor"``: by the model actor itself, as
            one process does (no decoded pixels cross the object store; measured fastest on
            CPU workers, benchmarks/bench_scale.py); ``"tasks"``: by separate Ray tasks that
            feed the actors (keeps GPU actors busy while CPUs decode); ``"auto"``: tasks when
            ``num_gpus_per_worker > 0``, else the actor.

    Returns:
        an :class:`EmbedReport`. Bad files are rows with an ``error`` (also in ``errors``).
    """
    if decode not in ("auto", "actor", "tasks"):
        raise ValueError(f"The 'decode' parameter must be 'auto', 'actor' or 'tasks'. Got {decode!r}.")
    decode = ("tasks" if num_gpus_per_worker else "actor") if decode == "auto" else decode
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value < _SHARD_STRIDE:
            raise ValueError(f"The {name!r} parameter must be an integer in [1, {_SHARD_STRIDE}). Got {value!r}.")
    start = time.perf_counter()
    output = os.fspath(output) if is_uri(os.fspath(output)) else str(Path(output).expanduser().resolve())
    spec, payload = _model_spec(model, backbone, weights, transform)
    name = _model_name(spec)
    listing = list_source(source)
    plan = _plan(listing, {**spec, "decode": decode}, int(shard_size))  # the two modes decode big photos differently
    if not is_uri(output):
        Path(output).mkdir(parents=True, exist_ok=True)
    if not is_uri(output):  # temporary files of a run that was killed mid-write
        for tmp in Path(output).glob(".part-*.tmp"):
            tmp.unlink(missing_ok=True)
    done = existing_files(output)
    pending = [(i, n, items) for i, (n, items) in enumerate(plan) if n not in done]
    report = EmbedReport(output, [f"{output.rstrip('/')}/{n}" for n, _ in plan], 0, len(plan) - len(pending),
                         len(listing))
    logger.info("%d images in %d shards: %d already embedded, %d to embed", len(listing), len(plan), report.reused,
                len(pending))
    report.embedded = sum(len(items) for _, _, items in pending)
    if pending:
        _run(pending, output, spec, payload, name, report, batch_size, num_cpus_per_worker, num_gpus_per_worker,
             concurrency, address, chunk_size, progress, decode)
    stale = sorted(n for n in done - {n for n, _ in plan} if n.startswith("part-") and n.endswith(".parquet"))
    fs, root = filesystem(output)
    for n in stale:  # shards of an earlier listing or model: no longer part of this output
        fs.delete_file(f"{root.rstrip('/')}/{n}")
    if stale:
        logger.info("removed %d shard(s) of an earlier run that no longer match the source or the model", len(stale))
    report.seconds = time.perf_counter() - start
    return report


def _run(pending, output, spec, payload, model_name, report, batch_size, cpus, gpus, concurrency, address,
         chunk_size, progress, decode) -> None:
    import pyarrow as pa
    from tqdm.auto import tqdm

    expected = {i: len(items) for i, _, items in pending}
    names = {i: n for i, n, _ in pending}
    rows = [(p, i, pos) for i, _, items in pending for pos, (p, _) in enumerate(items)]
    block = batch_size  # one input block per model batch: decoding streams into the actors batch by batch
    tables = [pa.table({"path": pa.array([r[0] for r in rows[s:s + block]], pa.string()),
                        "pos": pa.array([r[1] * _SHARD_STRIDE + r[2] for r in rows[s:s + block]], pa.int64())})
              for s in range(0, len(rows), block)]
    transform = _build(spec, payload)[1] if decode == "tasks" else None  # the decode tasks need the transform
    with _ray_session(address) as ray:
        import ray.data

        total = ray.cluster_resources()
        if cpus is None:  # "actor": the threads of one process on a node, as extract_features uses them
            node_cpus = [n["Resources"].get("CPU", 1) for n in ray.nodes() if n.get("Alive")] or [1]
            cpus = 1 if decode == "tasks" else max(1, min(4, int(max(node_cpus))))
        if concurrency is None:
            share = 0.75 if decode == "tasks" else 1.0  # decode tasks get the rest
            concurrency = (max(1, int(total.get("GPU", 0) // gpus)) if gpus else
                           max(1, int(total.get("CPU", 1) * share // cpus)))
        pool = (ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
                if isinstance(concurrency, tuple) else ray.data.ActorPoolStrategy(size=int(concurrency)))
        ctx = ray.data.DataContext.get_current()
        saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False
        try:
            ds = ray.data.from_arrow(tables)
            if decode == "tasks":
                ds = ds.map_batches(decode_batch, fn_kwargs={"transform": transform}, batch_size=batch_size,
                                    batch_format="numpy", num_cpus=0.25)
            ds = (ds.map_batches(_Embedder, fn_constructor_kwargs={
                      "spec": spec, "payload": payload, "use_gpu": bool(gpus), "threads": max(1, int(cpus)),
                      "chunk_size": chunk_size}, batch_size=batch_size, batch_format="numpy", compute=pool,
                      num_cpus=cpus, num_gpus=gpus or None))
            parts: dict[int, list] = {}
            got: dict[int, int] = {}
            with tqdm(total=len(rows), desc="embed", unit="img", disable=not progress) as bar:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    shard = batch["pos"] // _SHARD_STRIDE
                    for i in np.unique(shard):
                        sel = shard == i
                        parts.setdefault(int(i), []).append({k: v[sel] for k, v in batch.items()})
                        got[int(i)] = got.get(int(i), 0) + int(sel.sum())
                        if got[int(i)] == expected[int(i)]:
                            table = shard_table(parts.pop(int(i)), model_name, spec,
                                                 int(np.asarray(batch["embedding"]).reshape(len(sel), -1).shape[1]))
                            write_shard(output, names[int(i)], table)
                            report.written += 1
                            report.errors += [(p, e) for p, e in zip(table.column("path").to_pylist(),
                                                                     table.column("error").to_pylist()) if e]
                    bar.update(len(shard))
        finally:
            ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
    for _, reason in report.errors:
        logger.warning("not embedded: %s", reason)


# ---------------------------------------------------------------------------- the CLI's path
def index_folder_ray(folder, out, model=None, backbone: str | None = None, weights=None, backend: str = "auto",
                     batch_size: int = 32, address: str | None = None, num_cpus_per_worker: float | None = None,
                     num_gpus_per_worker: float = 0, concurrency=None, shard_size: int = 10_000,
                     progress: bool = True):
    """``utils-cv-similarity index FOLDER --out DIR --engine ray``: embed ``folder`` on Ray and
    write the folder :func:`collection.index_folder` writes (collection.json, features.npy,
    index/; ``query`` and ``duplicates`` open it as any other), plus the shards in ``DIR/shards``
    (a re-run resumes from them: only new or changed files are embedded again).

    Returns:
        a :class:`~utils_cv.similarity.collection.IndexReport` (``reused``: images of shards
        found complete).
    """
    from utils_cv.common.download import sha256sum
    from utils_cv.similarity import collection

    start = time.perf_counter()
    root, out = collection.check_folders(folder, out, backend)
    spec = collection.model_spec(model, backbone, weights)
    report = embed(root, out / "shards", model=model, backbone=backbone or collection.DEFAULT_BACKBONE,
                   weights=weights, batch_size=batch_size, num_cpus_per_worker=num_cpus_per_worker,
                   num_gpus_per_worker=num_gpus_per_worker, concurrency=concurrency, address=address,
                   shard_size=shard_size, progress=progress)
    paths, feats, errors = load_embeddings(report.shards)
    if not paths:
        raise ValueError(f"No image under {str(root)!r} could be embedded ({len(errors)} failed; see the log).")
    entries = []
    for p in paths:
        st = os.stat(p)
        entries.append({"path": Path(p).relative_to(root).as_posix(), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                        "sha256": sha256sum(p)})
    skipped = [(p, reason) for p, reason in errors]
    collection.add_perceptual_hashes(root, entries, previous=out)  # unchanged files keep theirs
    chosen = collection.write_collection(out, root, spec, entries, feats, skipped, backend)
    result = collection.IndexReport(out, len(entries), report.embedded - len(report.errors),
                                    report.rows - report.embedded, 0, skipped, chosen, time.perf_counter() - start)
    logger.info("indexed %d images in %s on Ray (%d shards embedded, %d reused) with %s in %.1f s", len(entries), out,
                report.written, report.reused, chosen, result.seconds)
    return result
