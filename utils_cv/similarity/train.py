"""Fine-tuning for similarity with fastai: a softmax baseline and a NormSoftmax head.

The recipe ("Classification is a Strong Baseline for Deep Metric Learning", Zhai & Wu,
BMVC 2019): train a classifier and use its penultimate representation as the embedding.
NormSoftmax makes the embedding and the class weights unit-length and divides their cosine
by a temperature (0.05), after a parameter-free LayerNorm of the pooled features; batches are
class-balanced and the head learns faster than the body.

Retrieval-aware validation: after every epoch (and once before the first) the callback
:class:`RetrievalValidation` embeds validation images, measures MAP@R and keeps the best
weights, so training never hands back a model that retrieves worse on validation data than
the pretrained one it started from. Why: plain fine-tuning on few classes was measured to
make retrieval on unseen classes worse than ImageNet features.

Randomness: fastai draws from the global torch / numpy / random generators, so
:func:`fine_tune` seeds them inside ``torch.random.fork_rng`` and restores the caller's
numpy and random states afterwards.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils_cv.common.paths import atomic_write
from utils_cv.common.versions import library_versions
from utils_cv.similarity import data as data_mod
from utils_cv.similarity import features as features_mod
from utils_cv.similarity import metrics as metrics_mod
from utils_cv.similarity import model as model_mod

logger = logging.getLogger(__name__)

__all__ = [
    "HEADS",
    "RetrievalValidation",
    "SimilarityNet",
    "create_learner",
    "embedding_model",
    "fine_tune",
    "load",
    "save",
]

HEADS = ("softmax", "normsoftmax")
FORMAT = "utils_cv.similarity/1"


class _CosineClassifier(nn.Module):
    """Logits = cos(embedding, class weight) / temperature."""

    def __init__(self, dim: int, n_classes: int, temperature: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) * 0.01)
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1)) / self.temperature


class SimilarityNet(nn.Module):
    """Backbone + head. ``forward`` gives class logits (for training), ``embed`` the embedding.

    * ``softmax``: pooled backbone features -> dropout -> linear classifier; the embedding is
      the pooled features (the penultimate representation).
    * ``normsoftmax``: pooled features -> LayerNorm (no affine) -> linear to
      ``embedding_dim`` -> cosine classifier / temperature; the embedding is the L2-normalised
      output of the linear layer.
    """

    def __init__(self, body: nn.Module, n_classes: int, head: str = "softmax", embedding_dim: int | None = None,
                 temperature: float = 0.05, dropout: float = 0.2):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"The 'head' parameter must be one of {set(HEADS)}. Got {head!r} instead.")
        self.body = body
        self.head_type = head
        width = int(body.feature_dim)
        if head == "softmax":
            self.neck = nn.Identity()
            self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, n_classes))
            self.embedding_dim = width
        else:
            dim = int(embedding_dim or 512)
            self.neck = nn.Sequential(nn.LayerNorm(width, elementwise_affine=False), nn.Linear(width, dim))
            self.classifier = _CosineClassifier(dim, n_classes, temperature)
            self.embedding_dim = dim

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        z = self.neck(self.body(x))
        return F.normalize(z, dim=1) if self.head_type == "normsoftmax" else z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.neck(self.body(x)))


class _Embedder(nn.Module):
    """The embedding half of a :class:`SimilarityNet`, as a plain module (no hooks)."""

    def __init__(self, net: SimilarityNet):
        super().__init__()
        self.net = net
        self.feature_dim = net.embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.embed(x)


# ---------------------------------------------------------------------------- data
def _fastai():
    import fastai.vision.all as fv

    return fv


def _transform_config(transform) -> dict:
    """mean, std, interpolation and sizes of a backbone's eval transform."""
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


def _split_valid(paths, labels, valid, seed):
    """(train_idx, fastai_valid_idx, retrieval (paths, labels))."""
    paths, labels = list(paths), list(labels)
    if isinstance(valid, (int, float)) and not isinstance(valid, bool):
        train_idx, valid_idx = data_mod.split_by_image(paths, labels, test_size=float(valid), seed=seed)
        retrieval = ([paths[i] for i in valid_idx], [labels[i] for i in valid_idx])
        return train_idx, valid_idx, retrieval
    if isinstance(valid, tuple) and len(valid) == 2:
        train_idx, valid_idx = data_mod.split_by_image(paths, labels, test_size=0.1, seed=seed)
        return train_idx, valid_idx, (list(valid[0]), list(valid[1]))
    raise ValueError("The 'valid' parameter must be a share of the images (float in (0, 1)) or a "
                     f"(paths, labels) tuple of retrieval validation images. Got {type(valid).__name__}.")


def create_learner(
    paths: Sequence,
    labels: Sequence[str],
    backbone: str = "efficientnet_lite0",
    head: str = "softmax",
    embedding_dim: int | None = None,
    image_size: int = 160,
    batch_size: int = 32,
    seed: int = 0,
    valid: float | tuple = 0.2,
    pretrained: bool = True,
    temperature: float = 0.05,
    augment: bool = True,
    validate_every_epoch: bool = True,
    freeze_bn: bool | None = None,
):
    """A fastai Learner that fine-tunes ``backbone`` for similarity.

    Args:
        paths, labels: the training images and their classes.
        backbone: a name from ``model.available_backbones()`` (offline weights by default).
        head: ``"softmax"`` or ``"normsoftmax"``.
        embedding_dim: NormSoftmax embedding size (default 512).
        image_size: training and embedding input side (160 was measured better than 192 and
            faster than 224 on the default data set).
        batch_size: images per step.
        seed: seeds the split, the head's initialisation and the training order.
        valid: a share of ``paths`` (stratified) held out for validation, or a
            ``(paths, labels)`` tuple of retrieval validation images (e.g. held-out classes;
            10 % of the training images then serve for the validation loss).
        pretrained: ImageNet weights for the backbone.
        temperature: NormSoftmax temperature.
        augment: random crops, flips and light colour changes during training.
        validate_every_epoch: measure MAP@R on the validation images after every epoch and
            keep the best weights (:class:`RetrievalValidation`).
        freeze_bn: keep the batch-norm statistics of the pretrained backbone (recommended
            for small data sets and batches); None: frozen when ``pretrained``, updated when
            training from random weights.

    Returns:
        A fastai ``Learner``; ``learner.embedding_transform`` is the eval preprocessing and
        ``learner.skipped`` lists ``(path, reason)`` for images left out because they do not
        decode (each is logged).
    """
    fv = _fastai()
    if len(paths) != len(labels):
        raise ValueError(f"'paths' has {len(paths)} items but 'labels' has {len(labels)}: they must be aligned.")
    if head not in HEADS:
        raise ValueError(f"The 'head' parameter must be one of {set(HEADS)}. Got {head!r} instead.")
    # decode every image once: a truncated file would otherwise stop training mid-epoch
    paths, labels, skipped = data_mod.decodable([Path(p) for p in paths], [str(label) for label in labels])
    if isinstance(valid, tuple) and len(valid) == 2:
        v_paths, v_labels, v_skipped = data_mod.decodable([Path(p) for p in valid[0]], list(valid[1]))
        valid, skipped = (v_paths, v_labels), skipped + v_skipped
    if skipped:
        logger.warning("%d image(s) left out of training because they do not decode (learner.skipped lists them)",
                       len(skipped))
    if not paths:
        raise ValueError("None of the training images decodes; see the log for the reason of each.")
    train_idx, valid_idx, retrieval = _split_valid(paths, labels, valid, seed)
    classes = sorted({labels[i] for i in train_idx})
    with _seeded(seed):  # random weights (pretrained=False) and the head's initialisation
        body, transform = model_mod.create_backbone(backbone, pretrained=pretrained, image_size=image_size)
        cfg = _transform_config(transform)
        net = SimilarityNet(body, len(classes), head=head, embedding_dim=embedding_dim, temperature=temperature)

    items = list(range(len(paths)))
    if augment:
        item_tfms = fv.RandomResizedCrop(image_size, min_scale=0.35, ratio=(0.8, 1.25))
        batch_tfms = [*fv.aug_transforms(size=image_size, max_rotate=10.0, max_warp=0.0, max_zoom=1.0,
                                         max_lighting=0.2, p_affine=0.5),
                      fv.Normalize.from_stats(cfg["mean"], cfg["std"])]
    else:
        item_tfms = fv.Resize(image_size, method="squish")
        batch_tfms = [fv.Normalize.from_stats(cfg["mean"], cfg["std"])]
    block = fv.DataBlock(
        blocks=(fv.ImageBlock, fv.CategoryBlock(vocab=classes)),
        get_x=lambda i: fv.PILImage(data_mod.load_image(paths[i])),
        get_y=lambda i: labels[i],
        splitter=fv.IndexSplitter(valid_idx.tolist()),
        item_tfms=item_tfms,
        batch_tfms=batch_tfms,
    )
    device = None if torch.cuda.is_available() else torch.device("cpu")
    if batch_size > len(train_idx):  # fastai drops the last incomplete batch: a bigger batch would train nothing
        logger.warning("batch_size %d is more than the %d training images; using %d.", batch_size, len(train_idx),
                       len(train_idx))
        batch_size = len(train_idx)
    with _seeded(seed):
        if head == "normsoftmax":  # class-balanced batches: each image drawn with weight 1 / its class size
            counts = {c: sum(labels[i] == c for i in train_idx) for c in classes}
            wgts = np.array([1.0 / counts.get(labels[i], 1) for i in items])  # fastai picks the train rows
            dls = block.weighted_dataloaders(items, wgts=wgts, bs=batch_size, num_workers=0, device=device)
        else:
            dls = block.dataloaders(items, bs=batch_size, num_workers=0, device=device)
    if not validate_every_epoch:
        retrieval = ([], [])
    if freeze_bn is None:
        freeze_bn = pretrained
    cbs = [RetrievalValidation(retrieval[0], retrieval[1], transform)]
    if freeze_bn:
        cbs.append(_bn_freeze_callback())
    learner = fv.Learner(dls, net, loss_func=fv.CrossEntropyLossFlat(), metrics=fv.accuracy,
                         splitter=lambda m: [list(m.body.parameters()), list(m.neck.parameters()) + list(m.classifier.parameters())],
                         cbs=cbs)
    if not torch.cuda.is_available():
        learner.model = learner.model.to(memory_format=torch.channels_last)
    learner.logger = lambda row: logger.info("epoch log: %s", row)  # library code logs, it does not print
    learner.embedding_transform = transform
    learner.skipped = skipped
    learner.similarity_config = {
        "backbone": backbone, "head": head, "embedding_dim": net.embedding_dim, "image_size": image_size,
        "classes": classes, "temperature": temperature, "preprocessing": cfg, "seed": seed, "freeze_bn": freeze_bn,
    }
    return learner


# ---------------------------------------------------------------------------- training
@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch, numpy and random inside; give the caller's generator states back after."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % (2**32))
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


class RetrievalValidation:
    """fastai callback: the per-epoch log (losses, accuracy and, when validation images are
    given, their MAP@R, measured once before training too); at the end of each fit the
    weights with the best MAP@R (epoch 0, the starting point, included) are restored."""

    def __new__(cls, *args, **kwargs):
        fv = _fastai()

        class _Callback(fv.Callback):
            order = 60  # after the Recorder has logged the epoch

            def __init__(self, paths, labels, transform, batch_size=32):
                self.val_paths, self.val_labels, self.transform = list(paths), list(labels), transform
                self.batch_size = batch_size
                self.history: list[dict] = []
                self.best_score, self.best_state, self.best_epoch = -1.0, None, None
                counts = {c: self.val_labels.count(c) for c in set(self.val_labels)}
                self.measures = bool(counts) and max(counts.values()) >= 2

            def _score(self) -> float:
                module = _Embedder(self.learn.model)
                feats = features_mod.extract_features(module, self.val_paths, self.transform,
                                                      batch_size=self.batch_size, progress=False)
                return metrics_mod.evaluate_retrieval(feats, self.val_labels, ks=(1,))["map@r"]

            def _record(self, entry: dict) -> None:
                if self.measures:
                    entry["map@r"] = score = self._score()
                    logger.info("epoch %d: validation MAP@R %.4f", entry["epoch"], score)
                    if score > self.best_score:
                        self.best_score, self.best_epoch = score, entry["epoch"]
                        self.best_state = copy.deepcopy(self.learn.model.state_dict())
                self.history.append(entry)

            # Learner.validate fires fit and epoch events too: only epochs that trained count
            def before_fit(self):
                self.trained_in_fit = False
                # lr_find trains with wild learning rates and restores the weights itself
                self.active = not hasattr(self.learn, "lr_finder")

            def before_epoch(self):
                self.trained_in_epoch = False

            def before_train(self):
                if not getattr(self, "active", True):
                    return
                if not self.history and self.measures:
                    self._record({"epoch": 0})  # the starting point
                self.trained_in_fit = self.trained_in_epoch = True

            def after_epoch(self):
                if not getattr(self, "trained_in_epoch", False):
                    return
                entry = {"epoch": len(self.history) + (0 if self.measures else 1)}
                for name, value in zip(self.learn.recorder.metric_names, self.learn.recorder.log):
                    if name not in ("epoch", "time"):
                        with contextlib.suppress(TypeError, ValueError):
                            entry[name] = float(value)
                self._record(entry)

            def after_fit(self):
                if getattr(self, "trained_in_fit", False) and self.best_state is not None:
                    self.learn.model.load_state_dict(self.best_state)
                    logger.info("kept the weights of epoch %s (validation MAP@R %.4f)", self.best_epoch, self.best_score)

        return _Callback(*args, **kwargs)


def _bn_freeze_callback():
    fv = _fastai()

    class FrozenBatchNormStats(fv.Callback):
        """Keep every batch norm in eval mode while training: its statistics stay those of
        the pretrained network (small, augmented batches would otherwise drift them; measured
        here to cost validation MAP@R even in the frozen epochs)."""

        order = 1  # after TrainEvalCallback has put the model in train mode

        def before_train(self):
            for m in self.learn.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    return FrozenBatchNormStats()


def _retrieval_cb(learner):
    for cb in learner.cbs:
        if hasattr(cb, "history") and hasattr(cb, "best_state"):
            return cb
    return None


def fine_tune(learner, epochs: int, lr: float | None = None, freeze_epochs: int = 2, seed: int | None = None,
              progress: bool = True, lr_mult: float = 5, freeze_lr: float | None = 1e-2) -> list[dict]:
    """fastai one-cycle fine-tuning: ``freeze_epochs`` with the body frozen, then ``epochs``
    with everything training (the body at ``lr / lr_mult``, the head at ``lr``).

    The defaults are the recipe measured on the default data set (README, "Quality"): 2
    frozen epochs at 1e-2, then the body at 4e-4 and the head at 2e-3. fastai's own defaults
    (1 frozen epoch, body at lr / 100) left the embedding close to the ImageNet one.

    Args:
        learner: from :func:`create_learner`.
        epochs: unfrozen epochs.
        lr: the head's learning rate once unfrozen; None uses 2e-3. ``learner.lr_find()``
            suggests one.
        freeze_epochs: epochs with only the head training.
        lr_mult: the body learns ``lr_mult`` times slower than the head once unfrozen.
        freeze_lr: the learning rate of the frozen epochs; None uses fastai's ``2 * lr``.
        seed: the training order and augmentation; default the learner's seed.
        progress: fastai's progress bars.

    Returns:
        The per-epoch log: one dict per epoch (0 = before training) with ``map@r`` on the
        validation images when the learner validates by retrieval, and the losses.
    """
    if epochs < 0 or freeze_epochs < 0:
        raise ValueError("'epochs' and 'freeze_epochs' must be >= 0.")
    config = getattr(learner, "similarity_config", {})
    if lr is None:
        lr = 2e-3
    seed = config.get("seed", 0) if seed is None else seed
    ctx = contextlib.nullcontext() if progress else learner.no_bar()
    with _seeded(seed), ctx:
        if freeze_epochs > 0:
            learner.freeze()
            learner.fit_one_cycle(freeze_epochs, 2 * lr if freeze_lr is None else freeze_lr)
        learner.unfreeze()
        if epochs > 0:
            learner.fit_one_cycle(epochs, slice(lr / lr_mult, lr), pct_start=0.3, div=5.0)
    cb = _retrieval_cb(learner)
    log = [dict(h) for h in cb.history] if cb is not None else []
    learner.similarity_log = log
    return log


# ---------------------------------------------------------------------------- using and saving
def embedding_model(learner) -> tuple[nn.Module, Callable]:
    """``(module, transform)`` for ``features.extract_features``: the penultimate pooled
    features (softmax) or the normalised embedding (NormSoftmax), in eval mode."""
    net = learner.model if hasattr(learner, "model") else learner
    if not isinstance(net, SimilarityNet):
        raise TypeError("embedding_model needs a Learner from train.create_learner (its model is a SimilarityNet).")
    module = _Embedder(net).eval()
    return module, learner.embedding_transform


def save(learner, path: str | os.PathLike) -> Path:
    """Save weights + metadata in one file (atomically), and the metadata as JSON beside it.

    The file holds ``{"format", "metadata" (a JSON string), "state_dict"}``; it loads with
    ``torch.load(..., weights_only=True)``. ``<path>.json`` repeats the metadata for people
    and tools; :func:`load` reads the copy inside the weights file.
    """
    path = Path(path)
    config = dict(getattr(learner, "similarity_config", {}))
    if not config:
        raise ValueError("save needs a Learner from train.create_learner (no similarity_config found).")
    net = learner.model
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {"format": FORMAT, **config, "versions": library_versions("torch", "timm", "fastai"),
            "tensors": {k: list(v.shape) for k, v in state.items()}}
    if getattr(learner, "similarity_log", None):
        meta["training_log"] = learner.similarity_log
    text = json.dumps(meta, indent=1, default=str)
    with atomic_write(path) as f:
        torch.save({"format": FORMAT, "metadata": text, "state_dict": state}, f)
    with atomic_write(path.with_name(path.name + ".json"), "w") as f:
        f.write(text)
    return path


def load(path: str | os.PathLike) -> tuple[nn.Module, Callable]:
    """Rebuild a saved model: ``(module, transform)`` ready for ``features.extract_features``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a file written by :func:`save`, or its metadata does not match its
            weights (names, shapes or classes); the message says what differs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Model file {str(path)!r} does not exist.")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupted or not a torch file, or unsafe pickle
        raise ValueError(f"{str(path)!r} is not a readable model file ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or "metadata" not in blob or "state_dict" not in blob:
        raise ValueError(f"{str(path)!r} was not written by utils_cv.similarity.train.save (format {FORMAT}).")
    try:
        meta = json.loads(blob["metadata"])
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r}: its metadata is not valid JSON ({exc}).") from exc
    state = blob["state_dict"]
    declared = meta.get("tensors", {})
    actual = {k: list(v.shape) for k, v in state.items()}
    if declared != actual:
        diff = sorted(k for k in set(declared) | set(actual) if declared.get(k) != actual.get(k))
        raise ValueError(f"{str(path)!r}: its weights do not match its metadata (differences in {diff[:5]}).")
    for key in ("backbone", "head", "classes", "image_size", "embedding_dim"):
        if key not in meta:
            raise ValueError(f"{str(path)!r}: metadata lacks {key!r}.")
    body, transform = model_mod.create_backbone(meta["backbone"], pretrained=False, image_size=meta["image_size"])
    net = SimilarityNet(body, len(meta["classes"]), head=meta["head"], embedding_dim=meta["embedding_dim"],
                        temperature=meta.get("temperature", 0.05))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{str(path)!r}: its weights do not fit a {meta['backbone']} / {meta['head']} model ({exc}).") from exc
    module = _Embedder(net).eval()
    module.metadata = meta
    return module, transform
