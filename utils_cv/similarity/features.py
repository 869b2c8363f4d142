"""Batched embedding extraction: images in, (n, d) float32 L2-normalised features out."""
from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from utils_cv.similarity.data import load_image

logger = logging.getLogger(__name__)

__all__ = ["ImageDecodeError", "extract_features", "l2_normalize"]


class ImageDecodeError(ValueError):
    """An image could not be read or decoded; the message names the file."""


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm (zero rows stay zero). Returns float32, C-contiguous."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, eps), dtype=np.float32)


def _to_pil(item) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, np.ndarray):
        if item.ndim == 2:
            item = np.stack([item] * 3, axis=-1)
        if item.ndim != 3 or item.shape[2] not in (3, 4):
            raise ValueError(f"an in-memory image must be (H, W), (H, W, 3) or (H, W, 4); got shape {item.shape}")
        if item.dtype != np.uint8:
            item = np.clip(item, 0, 255).astype(np.uint8)
        return Image.fromarray(item[..., :3])
    return load_image(item)


class _ImageDataset(Dataset):
    def __init__(self, items: Sequence, transform: Callable, skip_errors: bool):
        self.items = items
        self.transform = transform
        self.skip_errors = skip_errors

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            return i, self.transform(_to_pil(item))
        except Exception as exc:  # noqa: BLE001 - re-raised with the file's name
            name = item if isinstance(item, (str, os.PathLike)) else f"item {i}"
            message = f"Could not decode image {str(name)!r}: {type(exc).__name__}: {exc}"
            if self.skip_errors:
                logger.warning("skipped %s", message)
                return i, None
            raise ImageDecodeError(
                f"{message}. Remove or fix the file (data.scan_images lists unreadable files), "
                "or pass on_error='skip'."
            ) from exc


def _collate(batch):
    kept = [(i, x) for i, x in batch if x is not None]
    if not kept:
        return torch.empty(0, dtype=torch.int64), None
    return torch.tensor([i for i, _ in kept]), torch.stack([x for _, x in kept])


def _embedding_module(model) -> nn.Module:
    """The module to run: ``model`` itself, or the body of a fastai Learner."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):  # a fastai Learner: its body, pooled below
        return inner[0] if isinstance(inner, nn.Sequential) and len(inner) == 2 else inner
    raise TypeError(f"The 'model' parameter must be a torch.nn.Module or a fastai Learner. Got {type(model).__name__}.")


_CPU_CHUNK = 4


def _folded(model: nn.Module) -> nn.Module:
    """The batch-norm-folded copy of ``model``, cached on it until its weights change."""
    from utils_cv.similarity.fuse import fold_batchnorm

    key = (tuple(t._version for t in model.parameters()), tuple(t._version for t in model.buffers()),
           tuple(t.data_ptr() for t in model.parameters()))
    cached = model.__dict__.get("_utils_cv_folded")
    if cached is not None and cached[0] == key:
        return cached[1]
    folded = fold_batchnorm(model)
    model.__dict__["_utils_cv_folded"] = (key, folded)
    return folded


def _default_workers(n: int, batch_size: int) -> int:
    if n <= batch_size:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # measured (benchmarks/bench_features.py): on 2 cores a decoding worker steals a core
    # from the forward pass (30 vs 42 img/s), so workers pay off only with cores to spare
    return 0 if cpus <= 2 else min(4, cpus // 2)


def extract_features(
    model: nn.Module,
    paths: Sequence,
    transform: Callable,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    on_error: str = "raise",
    chunk_size: int | None = None,
    fold_bn: bool = True,
):
    """Embed images with ``model`` (its pooled output), one row per input, L2-normalised.

    Args:
        model: maps (B, 3, H, W) to (B, d), e.g. from ``model.create_backbone``; a model
            returning (B, C, H, W) maps (a CNN body, a fastai Learner's body) is average-pooled.
        paths: image files, or in-memory PIL images / (H, W, 3) uint8 RGB arrays.
        transform: the model's preprocessing (PIL image -> (3, H, W) tensor).
        batch_size: images per forward pass.
        num_workers: DataLoader worker processes decoding images while the model runs;
            None picks 0 on machines with 2 CPUs or fewer (decoding in this process is
            faster there) and half the CPUs, at most 4, otherwise.
        progress: show a progress bar.
        device: where to run; None keeps the model's own device.
        chunk_size: images per forward call inside a batch; None picks 4 on the CPU (a
            micro-batch whose activations stay in cache: lite0 with folded batch norms runs
            at about 120 img/s by 4 and 90 by 16 on 2 cores) and the whole batch on a GPU.
        fold_bn: run a copy with batch norms folded into their convolutions (same features
            to 1e-5, 1.4-1.7x faster on the CPU; see :mod:`utils_cv.similarity.fuse`).
        on_error: ``"raise"`` stops at the first image that cannot be decoded;
            ``"skip"`` logs it, leaves it out and returns which rows exist.

    Returns:
        (n, d) float32, C-contiguous, rows of unit L2 norm, aligned with ``paths``. With
        ``on_error="skip"``: ``(features, kept)``, ``kept`` the int64 indices into ``paths``
        of the rows of ``features``.

    Raises:
        ImageDecodeError: an image could not be decoded (``on_error="raise"``); the message
            names it.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"The 'on_error' parameter must be 'raise' or 'skip'. Got {on_error!r} instead.")
    model = _embedding_module(model)
    if batch_size < 1:
        raise ValueError(f"The 'batch_size' parameter must be >= 1. Got {batch_size!r} instead.")
    items = list(paths)
    if not items:
        raise ValueError("The 'paths' parameter is empty: give at least one image.")
    if device is not None:
        model = model.to(device)
    dev = next(model.parameters()).device
    if num_workers is None:
        num_workers = _default_workers(len(items), batch_size)
    in_memory = not all(isinstance(p, (str, os.PathLike)) for p in items)
    if in_memory:
        num_workers = 0
    loader = DataLoader(
        _ImageDataset(items, transform, skip_errors=on_error == "skip"), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, pin_memory=dev.type == "cuda", collate_fn=_collate,
    )
    was_training = model.training
    model.eval()
    user_model = model
    if fold_bn:
        model = _folded(model)
    channels_last = dev.type == "cpu"
    if chunk_size is None:
        chunk_size = _CPU_CHUNK if dev.type == "cpu" else batch_size
    if chunk_size < 1:
        raise ValueError(f"The 'chunk_size' parameter must be >= 1. Got {chunk_size!r} instead.")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    out, kept = [], []
    from tqdm.auto import tqdm

    try:
        with torch.inference_mode(), tqdm(total=len(items), desc="features", unit="img", disable=not progress) as bar:
            for index, batch in loader:
                if batch is not None:
                    batch = batch.to(dev, non_blocking=True)
                    if channels_last:
                        batch = batch.contiguous(memory_format=torch.channels_last)
                    emb = torch.cat([model(part) for part in batch.split(chunk_size)])
                    if emb.ndim == 4:
                        emb = emb.mean(dim=(2, 3))
                    elif emb.ndim != 2:
                        emb = emb.flatten(1)
                    out.append(emb.float().cpu().numpy())
                    kept.append(index.numpy())
                bar.update(min(batch_size, len(items) - bar.n))
    finally:
        user_model.train(was_training)
    if on_error == "skip":
        if not out:
            raise ImageDecodeError(f"None of the {len(items)} images could be decoded.")
        return l2_normalize(np.concatenate(out, axis=0)), np.concatenate(kept).astype(np.int64)
    return l2_normalize(np.concatenate(out, axis=0))
