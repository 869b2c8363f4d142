"""Decoding images into batches for :class:`~utils_cv.similarity.features.FeatureExtractor`.

Every item, a file or an in-memory image, goes through :func:`to_rgb_image`, so the same
pixels give the same features whatever the container. :class:`ImageDataset` decodes one item
(and hashes it when asked) and reports a failure instead of raising; :func:`collate` makes a
batch of what decoded. Batches come from a DataLoader (worker processes with spare cores) or,
for the exported runtimes on a few cores, from :func:`threaded_batches`: decoding threads
working ahead while the runtime computes (Pillow and the runtimes release the GIL).
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from utils_cv.similarity.data import load_image, to_rgb

__all__ = ["ImageDataset", "collate", "default_workers", "min_side", "threaded_batches", "to_rgb_image",
           "transform_config"]


_ARRAY_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in _ARRAY_MODES or min(arr.shape[:2]) < 1:
        hint = " (channels first? use arr.transpose(1, 2, 0))" if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) else ""
        raise ValueError(f"An in-memory image must be an (H, W), (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4) "
                         f"array; got shape {arr.shape}{hint}.")
    kind = arr.dtype.kind
    if kind == "f":
        if not np.isfinite(arr).all():
            raise ValueError("An in-memory float image holds NaN or infinite values.")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"An in-memory float image must hold values in [0, 1]; got [{lo:g}, {hi:g}]. For 0-255 "
                             "values pass arr.astype(np.uint8); for other ranges rescale to [0, 1] first.")
        arr = np.rint(arr * 255.0).astype(np.uint8)
    elif kind in "ui":
        lo, hi = int(arr.min()), int(arr.max())
        if arr.dtype == np.uint16 and hi > 255:  # 16-bit, as 16-bit PNG files are read
            arr = (arr.astype(np.float32) / 65535.0 * 255).clip(0, 255).astype(np.uint8)
        elif lo < 0 or hi > 255:
            raise ValueError(f"An in-memory integer image must hold values in [0, 255]; got [{lo}, {hi}].")
        else:
            arr = arr.astype(np.uint8)
    else:
        raise ValueError(f"An in-memory image must be an unsigned integer or float array; got dtype {arr.dtype}.")
    mode = _ARRAY_MODES[arr.shape[2]]
    return Image.fromarray(np.ascontiguousarray(arr if mode != "L" else arr[:, :, 0]), mode=mode)


def to_rgb_image(item, min_size: int | None = None) -> Image.Image:
    """The RGB image the model sees for ``item``, the same whatever the container.

    Args:
        item: an image file path; a PIL image (its EXIF orientation applied, as for a file);
            or an (H, W), (H, W, 1), (H, W, 2) (grey + alpha), (H, W, 3) RGB or (H, W, 4) RGBA
            array. Integer arrays hold 0-255 (uint16 over 255: 16-bit, scaled as 16-bit files
            are); float arrays hold [0, 1] and are scaled to 0-255. Float arrays outside
            [0, 1] are refused rather than guessed at: a float image with values up to 1.0 is
            equally plausible as a dark 0-255 image, and reading it the wrong way gives
            features of a black or a saturated picture without any sign of the mistake.

    Transparency (RGBA, LA, P with a transparent colour) is composited on white, as for files.
    ``min_size``: for files, decode big photos at a reduced scale keeping the shorter side >=
    ``min_size`` (see :func:`utils_cv.similarity.data.load_image`).

    Raises:
        ValueError: an array of another shape, dtype or value range (the message says which).
    """
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, np.ndarray):
        return to_rgb(_array_to_pil(item))
    if isinstance(item, (str, os.PathLike)):
        return load_image(item, min_size=min_size)
    raise TypeError(f"An image must be a path, a PIL image or a numpy array; got {type(item).__name__}.")


def min_side(transform) -> int | None:
    """The shorter side the transform's first resize needs, or None when it has none."""
    for t in getattr(transform, "transforms", []):
        size = getattr(t, "size", None)
        if type(t).__name__ == "Resize" and size is not None:
            if isinstance(size, int):
                return size
            size = [int(v) for v in size]
            return max(size) if size else None
    return None


class ImageDataset(Dataset):
    def __init__(self, items: Sequence, transform: Callable, min_size: int | None = None, hash_fn=None):
        self.items = items
        self.transform = transform
        self.min_size = min_size
        self.hash_fn = hash_fn  # e.g. dedup.perceptual_hash, computed from the same decode

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            image = to_rgb_image(item, self.min_size)
            return i, (self.transform(image), self.hash_fn(image) if self.hash_fn else None), None
        except Exception as exc:  # noqa: BLE001 - reported with the item's name
            name = item if isinstance(item, (str, os.PathLike)) else f"item {i}"
            return i, None, f"Could not decode image {str(name)!r}: {type(exc).__name__}: {exc}"


def collate(batch):
    kept = [(i, x) for i, x, _ in batch if x is not None]
    failed = [(i, why) for i, x, why in batch if x is None]
    if not kept:
        return torch.empty(0, dtype=torch.int64), None, failed, []
    return (torch.tensor([i for i, _ in kept]), torch.stack([x for _, (x, _) in kept]), failed,
            [h for _, (_, h) in kept])


def default_workers(n: int, batch_size: int) -> int:
    if n <= batch_size:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # measured (benchmarks/bench_features.py): on 2 cores a decoding worker steals a core
    # from the forward pass (30 vs 42 img/s), so workers pay off only with cores to spare
    return 0 if cpus <= 2 else min(4, cpus // 2)


def threaded_batches(dataset: ImageDataset, batch_size: int, threads: int = 2, ahead: int = 2) -> Iterator:
    """The collated batches of ``dataset`` in order, their images decoded by ``threads`` threads
    (one image per task, so a few large photos spread over the threads too) while the caller
    works on the previous batches; at most ``ahead`` batches of images are in flight."""
    indices = iter(range(len(dataset)))
    with ThreadPoolExecutor(threads, thread_name_prefix="utils_cv-decode") as pool:
        pending = deque(pool.submit(dataset.__getitem__, i) for i in islice(indices, max(1, ahead) * batch_size))
        while pending:
            batch = []
            while pending and len(batch) < batch_size:
                batch.append(pending.popleft().result())
                i = next(indices, None)
                if i is not None:
                    pending.append(pool.submit(dataset.__getitem__, i))
            yield collate(batch)


def transform_config(transform) -> dict:
    """mean, std, interpolation and sizes of a backbone's eval transform (the metadata a saved
    model carries)."""
    cfg = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    for t in getattr(transform, "transforms", []):
        name = type(t).__name__
        if name == "Normalize":
            cfg["mean"] = [float(v) for v in torch.as_tensor(t.mean).flatten()]
            cfg["std"] = [float(v) for v in torch.as_tensor(t.std).flatten()]
        elif name == "Resize":
            cfg["resize"] = t.size if isinstance(t.size, int) else list(t.size)
            cfg["interpolation"] = str(getattr(t.interpolation, "value", t.interpolation))
        elif name == "CenterCrop":
            cfg["crop"] = list(t.size)
    return cfg
