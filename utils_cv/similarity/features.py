"""Batched embedding extraction: images in, (n, d) float32 L2-normalised features out.

:class:`FeatureExtractor` runs a private, prepared copy of the model (batch norms folded,
channels_last on the CPU, eval mode) made when it is built, so the caller's model is never
changed (not its weights, memory format, training flag nor attributes). The copy is a
snapshot: after the model's weights change (training), build a new extractor; extractors
built for the same unchanged model share one copy (see ``runtime.prepared``), which is what keeps
repeated :func:`extract_features` calls, the one-call form, as fast as one extractor.

Every item, a file or an in-memory image, goes through :func:`to_rgb_image` (from
:mod:`utils_cv.similarity.loading`, which decodes the batches), so the same pixels give the same
features whatever the container.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from utils_cv.similarity.distances import l2_normalize
from utils_cv.similarity.loading import (ImageDataset, collate, default_workers, min_side, threaded_batches,
                                         to_rgb_image)

logger = logging.getLogger(__name__)

__all__ = ["Extraction", "FeatureExtractor", "ImageDecodeError", "extract_features", "l2_normalize", "to_rgb_image"]


class ImageDecodeError(ValueError):
    """An image could not be read or decoded; the message names the file."""


def _embedding_module(model) -> nn.Module:
    """The module to run: ``model`` itself, or the body of a fastai Learner."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):  # a fastai Learner: its body, pooled below
        return inner[0] if isinstance(inner, nn.Sequential) and len(inner) == 2 else inner
    raise TypeError(f"The 'model' parameter must be a torch.nn.Module or a fastai Learner. Got {type(model).__name__}.")


_CPU_CHUNK = 4


def _count_or_none(value, name: str):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"The {name!r} parameter must be an integer >= 0 or None. Got {value!r} instead.")
    return value


def _positive(value, name: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"The {name!r} parameter must be an integer >= 1. Got {value!r} instead.")
    return int(value)


# ---------------------------------------------------------------------------- extraction
def autocast(device: torch.device):
    """Mixed precision for inference where it pays: float16 autocast on CUDA; nothing (fp32)
    on the CPU and MPS, where the features stay exactly those of the fp32 model."""
    import contextlib

    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()


@dataclass
class Extraction:
    """What :meth:`FeatureExtractor.extract` returns.

    ``features``: (n_kept, d) float32, C-contiguous, rows of unit L2 norm; ``kept``: (n_kept,)
    int64 indices into the items of the rows of ``features``; ``skipped``: ``(item, reason)``
    for each item left out (``on_error="skip"``), in input order.
    """

    features: np.ndarray
    kept: np.ndarray
    skipped: list[tuple[object, str]] = field(default_factory=list)
    hashes: list[int] | None = None  # with extract(hashes=True): aligned with ``kept``


class FeatureExtractor:
    """Embeds images with a private, prepared copy of ``model``.

    Args:
        model: maps (B, 3, H, W) to (B, d), e.g. from ``model.create_backbone``; a model
            returning (B, C, H, W) maps (a CNN body, a fastai Learner's body) is average-pooled.
            It is copied here and never changed; later changes to it are not seen.
        transform: the model's preprocessing (PIL image -> (3, H, W) tensor).
        batch_size: images per loaded batch.
        device: where the copy runs; None keeps the model's own device (a model on the CPU
            stays on the CPU even where a GPU exists: moving work is the caller's choice);
            ``"auto"`` picks :func:`utils_cv.common.device.default_device` (``$UTILS_CV_DEVICE``,
            else CUDA, MPS, CPU).
        fold_bn: fold batch norms into their convolutions (same features to 1e-5, 1.4-1.7x
            faster on the CPU; see :mod:`utils_cv.similarity.fuse`).
        num_workers: DataLoader worker processes decoding files while the model runs; None
            picks 0 on machines with 2 CPUs or fewer (decoding in this process is faster there)
            and half the CPUs, at most 4, otherwise. In-memory images always use 0.
        chunk_size: images per forward call inside a batch; None picks 4 on the CPU (a
            micro-batch whose activations stay in cache: lite0 with folded batch norms runs at
            about 120 img/s by 4 and 90 by 16 on 2 cores) and the whole batch on a GPU.
        fast_decode: decode image files at least twice as large as the transform's resize at a
            reduced scale (JPEG draft mode; see :func:`utils_cv.similarity.data.load_image`):
            multi-megapixel photos embed many times faster with features that agree with a full
            decode (mean cosine >= 0.99 on real photos, BENCHMARKS.md). Smaller images are
            decoded exactly as before.
        runtime: ``"torch"`` (eager, the default), ``"onnx"`` (ONNX Runtime) or ``"openvino"``:
            the prepared copy exported once and cached (:mod:`utils_cv.similarity.runtime`);
            CPU only, same preprocessing.
        precision: ``"fp32"``; ``"int8"`` with ``runtime="onnx"``, ``"bf16"`` with
            ``runtime="openvino"`` (faster, features slightly different: BENCHMARKS.md).
        calibration: for ``int8``, the images (files, PIL images or arrays) to calibrate on;
            None: up to 256 images of the shipped default data set.
        decode_threads: threads decoding the next batches while the model runs (without
            worker processes); None: 2 with the exported runtimes, none with eager torch
            (measured on 2 cores: 1.2-1.25x faster end to end beside OpenVINO and ONNX Runtime;
            beside eager torch, whose own threads compete with them, 0.86-1.07x over runs;
            BENCHMARKS.md, "Exported runtimes").
    """

    def __init__(self, model, transform: Callable, batch_size: int = 64, device: str | torch.device | None = None,
                 fold_bn: bool = True, num_workers: int | None = None, chunk_size: int | None = None,
                 fast_decode: bool = True, runtime: str = "torch", precision: str = "fp32", calibration=None,
                 decode_threads: int | None = None):
        from utils_cv.similarity import runtime as rt

        module = _embedding_module(model)
        if not callable(transform):
            raise TypeError(f"The 'transform' parameter must be callable. Got {type(transform).__name__}.")
        self.transform = transform
        # big photos decode at a reduced scale that still covers the transform's resize
        self.min_size = min_side(transform) if fast_decode else None
        self.batch_size = _positive(batch_size, "batch_size")
        self.num_workers = _count_or_none(num_workers, "num_workers")
        self.decode_threads = _count_or_none(decode_threads, "decode_threads")
        if device is None:
            param = next(module.parameters(), None)
            self.device = param.device if param is not None else torch.device("cpu")
        elif isinstance(device, str) and device == "auto":
            from utils_cv.common.device import default_device

            self.device = default_device()
        else:
            self.device = torch.device(device)
        self.chunk_size = _positive(chunk_size, "chunk_size", allow_none=True) or (
            _CPU_CHUNK if self.device.type == "cpu" else self.batch_size)
        rt.check_runtime(runtime, precision, self.device)
        self.runtime, self.precision = runtime, precision
        self.channels_last = self.device.type == "cpu" and runtime == "torch"
        cpu = self.device.type == "cpu"
        if runtime == "torch":
            self._module = self._model = rt.prepared(module, self.device, bool(fold_bn), cpu)
        else:  # the inference copy is prepared only when no export of this model is cached
            self._module = module
            self._model = rt.ExportedModel(
                module, runtime, precision, calibration=lambda: self._calibration(calibration),
                prepare=lambda: rt.prepared(module, self.device, bool(fold_bn), cpu), tag=f"fold_bn={bool(fold_bn)}")

    def extract(self, items: Sequence, on_error: str = "raise", progress: bool = True,
                hashes: bool = False) -> Extraction:
        """Embed ``items`` (image files, PIL images or arrays; see :func:`to_rgb_image`).

        Args:
            on_error: ``"raise"`` stops at the first image that cannot be decoded;
                ``"skip"`` logs it, leaves it out and lists it in ``skipped``.
            progress: show a progress bar.
            hashes: also give each kept image's ``dedup.perceptual_hash``, computed from the
                image decoded for the model (no second decode; None where hashing fails).

        Returns:
            an :class:`Extraction`; with ``on_error="skip"`` and no decodable image, its
            ``features`` are (0, d) (d from :func:`utils_cv.similarity.model.num_features`, 0
            when it cannot be read) and every item is in ``skipped``.

        Raises:
            ImageDecodeError: an image could not be decoded (``on_error="raise"``); the
                message names it.
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"The 'on_error' parameter must be 'raise' or 'skip'. Got {on_error!r} instead.")
        items = list(items)
        if not items:
            raise ValueError("The 'items' parameter is empty: give at least one image.")
        in_memory = not all(isinstance(p, (str, os.PathLike)) for p in items)
        workers = self.num_workers if self.num_workers is not None else default_workers(len(items), self.batch_size)
        workers = 0 if in_memory else workers
        hash_fn = None
        if hashes:
            from utils_cv.similarity.dedup import try_perceptual_hash as hash_fn
        dataset = ImageDataset(items, self.transform, self.min_size, hash_fn)
        if self.runtime != "torch" and (shape := self._input_shape()) is not None:
            self._model.warm_up(shape)  # exported or compiled while the first images decode
        threads = self.decode_threads
        if threads is None:  # measured: threads pay beside the exported runtimes, not beside eager torch
            threads = 2 if self.runtime != "torch" and workers == 0 and len(items) > self.batch_size else 0
        if threads and not workers:
            loader = threaded_batches(dataset, self.batch_size, threads)
        else:
            loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=workers,
                                pin_memory=self.device.type == "cuda", collate_fn=collate)
        out, kept, skipped, found = [], [], [], []
        from tqdm.auto import tqdm

        with torch.inference_mode(), tqdm(total=len(items), desc="features", unit="img", disable=not progress) as bar:
            for index, batch, failed, batch_hashes in loader:
                for i, why in failed:
                    if on_error == "raise":
                        raise ImageDecodeError(
                            f"{why}. Remove or fix the file (data.scan_images lists unreadable files), or use "
                            "FeatureExtractor(model, transform).extract(items, on_error='skip') to leave it out.")
                    logger.warning("skipped %s", why)
                    skipped.append((items[i], why))
                if batch is not None:
                    out.append(self._forward(batch))
                    kept.append(index.numpy())
                    found += batch_hashes
                bar.update(len(index) + len(failed))
        if not out:  # only with on_error="skip": every item is in `skipped`
            logger.warning("none of the %d images could be decoded", len(items))
            return Extraction(np.empty((0, self._width()), np.float32), np.empty(0, np.int64), skipped,
                              [] if hashes else None)
        return Extraction(l2_normalize(np.concatenate(out, axis=0)), np.concatenate(kept).astype(np.int64), skipped,
                          found if hashes else None)

    def embed_batch(self, batch) -> np.ndarray:
        """Embed a batch already preprocessed by the transform ((B, 3, H, W) tensor or array):
        (B, d) float32 rows of unit L2 norm. For engines that decode elsewhere (Ray Data)."""
        batch = torch.as_tensor(np.ascontiguousarray(batch) if isinstance(batch, np.ndarray) else batch)
        if batch.ndim != 4 or len(batch) == 0:
            raise ValueError(f"The 'batch' parameter must be a non-empty (B, 3, H, W) batch. Got shape "
                             f"{tuple(batch.shape)}.")
        with torch.inference_mode():
            return l2_normalize(self._forward(batch))

    def _calibration(self, items) -> np.ndarray:
        """The int8 calibration batch: ``items`` (or images of the default data set), preprocessed."""
        if items is None:
            from utils_cv.similarity import data
            from utils_cv.similarity.runtime import CALIBRATION_IMAGES

            paths, _ = data.list_images(data.default_dataset())
            items = paths[:: max(1, len(paths) // CALIBRATION_IMAGES)][:CALIBRATION_IMAGES]
        return torch.stack([self.transform(to_rgb_image(it, self.min_size)) for it in items]).numpy()

    def _input_shape(self) -> tuple | None:
        """The transform's output shape when it does not depend on the image's size (crops)."""
        from PIL import Image

        try:
            shapes = {tuple(self.transform(Image.new("RGB", size, (128, 128, 128))).shape)
                      for size in ((320, 240), (240, 320))}
        except Exception:  # noqa: BLE001 - a transform that needs real images: built on first use
            return None
        return shapes.pop() if len(shapes) == 1 else None

    def _width(self) -> int:
        from utils_cv.similarity.model import num_features

        try:
            return num_features(self._module)
        except ValueError:
            return 0

    def _forward(self, batch: torch.Tensor) -> np.ndarray:
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(self.device):
            emb = torch.cat([self._model(part) for part in batch.split(self.chunk_size)])
        if emb.ndim == 4:
            emb = emb.mean(dim=(2, 3))
        elif emb.ndim != 2:
            emb = emb.flatten(1)
        return emb.float().cpu().numpy()


def extract_features(model, paths: Sequence, transform: Callable, batch_size: int = 64, num_workers: int | None = None,
                     progress: bool = True, device: str | torch.device | None = None, on_error: str = "raise",
                     chunk_size: int | None = None, fold_bn: bool = True) -> np.ndarray:
    """Embed images with ``model`` (its pooled output), one row per input, L2-normalised.

    ``FeatureExtractor(model, transform, ...).extract(paths).features``: the arguments are
    those of :class:`FeatureExtractor`; ``model`` is left as it was. To skip images that cannot
    be decoded and learn which rows exist, use ``FeatureExtractor.extract(..., on_error="skip")``.

    Returns:
        (n, d) float32, C-contiguous, rows of unit L2 norm, aligned with ``paths``.

    Raises:
        ImageDecodeError: an image could not be decoded; the message names it.
        ValueError: ``on_error`` is not ``"raise"`` (this function always returns one row per input).
    """
    if on_error != "raise":
        raise ValueError(f"The 'on_error' parameter of extract_features must be 'raise' (one row per input). Got "
                         f"{on_error!r}: to leave undecodable images out, use FeatureExtractor(model, transform)"
                         ".extract(items, on_error='skip'), which returns the features, the kept indices and the "
                         "skipped items.")
    extractor = FeatureExtractor(model, transform, batch_size=batch_size, device=device, fold_bn=fold_bn,
                                 num_workers=num_workers, chunk_size=chunk_size)
    return extractor.extract(paths, progress=progress).features
