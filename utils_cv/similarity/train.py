"""Fine-tuning for similarity with fastai: train a classifier, use its penultimate
representation as the embedding (Zhai & Wu, BMVC 2019). Heads, losses and the measured recipes
live in :mod:`~utils_cv.similarity.heads`; saving and loading in
:mod:`~utils_cv.similarity.checkpoint` (``save`` / ``load`` are re-exported here).

Retrieval-aware validation: after every epoch (and once before the first) the callback
:class:`RetrievalValidation` embeds validation images, measures MAP@R and keeps the best
weights, so training never hands back a model that retrieves worse on validation data than
the pretrained one it started from. Why: plain fine-tuning on few classes was measured to
make retrieval on unseen classes worse than ImageNet features. Not fastai's
``SaveModelCallback``: it monitors fastai's own validation pass, so it can score neither the
starting weights (epoch 0) nor a retrieval metric over other images, and it writes each best
state to a file.

State lives in objects this library creates, never on the Learner: the ``SimilarityNet``
(config, eval transform) and the :class:`RetrievalValidation` callback (log, best epoch,
images left out); :func:`fine_tune` returns them as a :class:`FineTuneResult`.

Randomness: fastai draws from the global generators, so :func:`fine_tune` seeds them inside
``torch.random.fork_rng`` and restores the caller's numpy and random states afterwards.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import random
import tempfile
import time
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from utils_cv.common.device import default_device
from utils_cv.similarity import data as data_mod
from utils_cv.similarity import model as model_mod
from utils_cv.similarity import robust
from utils_cv.similarity.callbacks import FrozenBatchNormStats, RetrievalValidation, fastai_vision, retrieval_validation
from utils_cv.similarity.checkpoint import FORMAT, load, save
from utils_cv.similarity.loading import transform_config
from utils_cv.similarity.heads import (DEFAULT_HEAD, HEADS, EmbeddingModel, SimilarityNet, create_loss, head_factory,
                                       recipe)

fv = fastai_vision()

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "HEADS",
    "FineTuneResult",
    "RetrievalValidation",
    "SimilarityNet",
    "create_learner",
    "embedding_model",
    "fine_tune",
    "load",
    "retrieval_validation",
    "save",
]


# ---------------------------------------------------------------------------- data
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
    backbone: str | None = None,
    head: str | Callable = DEFAULT_HEAD,
    embedding_dim: int | None = None,
    image_size: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    valid: float | tuple = 0.2,
    pretrained: bool = True,
    temperature: float = 0.05,
    augment: bool = True,
    validate_every_epoch: bool = True,
    freeze_bn: bool | None = None,
    loss: str | Callable | None = None,
    device: str | torch.device | None = None,
    mixed_precision: bool | None = None,
) -> fv.Learner:
    """A fastai Learner that fine-tunes ``backbone`` for similarity.

    ``backbone``, ``image_size`` and ``embedding_dim`` left None come from the head's recipe
    (``heads.RECIPES``: efficientnet_lite0 at 160 px, measured better than 192 and faster
    than 224 on the default data set; 512-d for NormSoftmax).

    Args:
        paths, labels: the training images and their classes.
        backbone: a name from ``model.available_backbones()`` (offline weights by default).
        head: a registered name (``heads.HEADS``: ``"softmax"``, ``"normsoftmax"``) or a head
            factory (``heads.register_head``).
        embedding_dim: the embedding size of heads that choose one.
        image_size: training and embedding input side.
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
        loss: None (the head's loss, cross-entropy for the built-ins), a registered name
            (``heads.LOSSES``) or a callable ``loss(output, target)``; an ``nn.Module`` loss
            with parameters has them trained with the head.
        device: where to train; None: ``utils_cv.common.device.default_device()``.
        mixed_precision: train in float16 autocast with loss scaling (fastai ``to_fp16``) and
            pinned-memory batches; None: on CUDA only. The CPU and MPS train in float32.

    Returns:
        A fastai ``Learner`` whose model is a ``heads.SimilarityNet``. Images that do not
        decode are left out, logged and listed by :func:`fine_tune`'s result. Its ``path`` is
        the temporary folder, so ``lr_find`` writes nothing in the working directory.
    """
    if len(paths) != len(labels):
        raise ValueError(f"'paths' has {len(paths)} items but 'labels' has {len(labels)}: they must be aligned.")
    head_name, _ = head_factory(head)
    defaults = recipe(head_name)
    backbone = defaults["backbone"] if backbone is None else backbone
    image_size = defaults["image_size"] if image_size is None else image_size
    embedding_dim = defaults["embedding_dim"] if embedding_dim is None else embedding_dim
    device = default_device() if device is None else torch.device(device)
    if mixed_precision is None:
        mixed_precision = device.type == "cuda"
    elif mixed_precision and device.type != "cuda":
        raise ValueError(f"The 'mixed_precision' parameter needs a CUDA device; training runs on {device}. Leave it "
                         "None (on CUDA only) or pass False.")
    # decode every image once: a truncated file would otherwise stop training mid-epoch
    paths, labels, skipped = data_mod.decodable([Path(p) for p in paths], [str(label) for label in labels])
    if isinstance(valid, tuple) and len(valid) == 2:
        v_paths, v_labels, v_skipped = data_mod.decodable([Path(p) for p in valid[0]], list(valid[1]))
        valid, skipped = (v_paths, v_labels), skipped + v_skipped
    if skipped:
        logger.warning("%d image(s) left out of training because they do not decode (fine_tune(...).skipped lists "
                       "them)", len(skipped))
    if not paths:
        raise ValueError("None of the training images decodes; see the log for the reason of each.")
    train_idx, valid_idx, retrieval = _split_valid(paths, labels, valid, seed)
    classes = sorted({labels[i] for i in train_idx})
    if freeze_bn is None:
        freeze_bn = pretrained
    with _seeded(seed):  # random weights (pretrained=False), the head's and the loss's initialisation (proxies)
        body, transform = model_mod.create_backbone(backbone, pretrained=pretrained, image_size=image_size)
        cfg = transform_config(transform)
        net = SimilarityNet(body, len(classes), head=head, embedding_dim=embedding_dim, temperature=temperature,
                            transform=transform)
        loss_func = create_loss(loss, n_classes=len(classes), embedding_dim=net.embedding_dim,
                                default=net.default_loss)
    net.config = {
        "backbone": backbone, "head": head_name, "embedding_dim": net.embedding_dim, "image_size": image_size,
        "classes": classes, "temperature": temperature, "preprocessing": cfg, "seed": seed, "freeze_bn": freeze_bn,
    }
    if isinstance(loss, str):
        net.config["loss"] = loss
    loss_params = list(loss_func.to(device).parameters()) if isinstance(loss_func, nn.Module) else []

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
    if batch_size > len(train_idx):  # fastai drops the last incomplete batch: a bigger batch would train nothing
        logger.warning("batch_size %d is more than the %d training images; using %d.", batch_size, len(train_idx),
                       len(train_idx))
        batch_size = len(train_idx)
    with _seeded(seed):
        if net.balanced_batches:  # each image drawn with weight 1 / its class size
            counts = {c: sum(labels[i] == c for i in train_idx) for c in classes}
            wgts = np.array([1.0 / counts.get(labels[i], 1) for i in items])  # fastai picks the train rows
            dls = block.weighted_dataloaders(items, wgts=wgts, bs=batch_size, num_workers=0, device=device,
                                             pin_memory=device.type == "cuda")
        else:
            dls = block.dataloaders(items, bs=batch_size, num_workers=0, device=device, pin_memory=device.type == "cuda")
        if net.m_per_class:  # groups of m images of one class, in a new random order each epoch
            ys = [labels[i] for i in dls.train.dataset.items]
            dls.train.get_idxs = lambda dl=dls.train: m_per_class_order(ys, net.m_per_class, dl.rng)
    if not validate_every_epoch:
        retrieval = ([], [])
    cbs = [RetrievalValidation(retrieval[0], retrieval[1], transform, skipped=skipped)]
    if freeze_bn:
        cbs.append(FrozenBatchNormStats())
    learner = fv.Learner(dls, net, loss_func=loss_func, metrics=fv.accuracy if net.logits else None,
                         splitter=lambda m: [list(m.body.parameters()),
                                             list(m.neck.parameters()) + list(m.classifier.parameters()) + loss_params],
                         cbs=cbs, path=Path(tempfile.gettempdir()), model_dir=".")
    if device.type != "cuda":
        learner.model = learner.model.to(memory_format=torch.channels_last)
    if mixed_precision:
        learner = learner.to_fp16()
    # library code logs, it does not print; fastai's rows (its own 0-based epochs) go to debug,
    # the retrieval validation logs one line per epoch in the numbering of the result's log
    learner.logger = lambda row: logger.debug("fastai row: %s", row)
    return learner


def m_per_class_order(labels: Sequence, m: int, rng) -> list[int]:
    """One epoch's order of the positions of ``labels``: each class's images shuffled and cut
    into groups of ``m`` (a short last group topped up with images of its class drawn again),
    the groups shuffled. Every batch then holds positives for pair-based losses and miners;
    classes with a single image cannot be a positive pair and are left out."""
    by_class: dict = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    groups = []
    for members in by_class.values():
        if len(members) < 2:
            continue
        members = list(members)
        rng.shuffle(members)
        for g in range(0, len(members), m):
            group = members[g : g + m]
            groups.append(group + [rng.choice(members) for _ in range(m - len(group))])
    rng.shuffle(groups)
    return [i for group in groups for i in group]


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


@dataclass
class FineTuneResult(SequenceABC):
    """What :func:`fine_tune` did. Indexing and iterating go through ``log`` (the per-epoch
    list of dicts earlier versions returned), so ``pd.DataFrame(result)`` and
    ``plot.plot_training_log(result)`` work as before.

    Attributes:
        log: one dict per epoch (0 = before training, when validating by retrieval) with the
            losses, accuracy and ``map@r`` on the validation images.
        best_epoch: the epoch whose weights the model holds (None without validation images).
        best_score: its validation MAP@R (None without validation images).
        skipped: ``(path, reason)`` for each image left out because it does not decode.
        seconds: wall-clock time of the call.
        wise_alpha: with ``wise_ft=True``, the mixing weight kept (:func:`robust.wise_ft`);
            ``wise_scores`` the validation MAP@R of each weight tried.
    """

    log: list[dict]
    best_epoch: int | None = None
    best_score: float | None = None
    skipped: list = field(default_factory=list)
    seconds: float = 0.0
    wise_alpha: float | None = None
    wise_scores: dict = field(default_factory=dict)

    def __getitem__(self, i):
        return self.log[i]

    def __len__(self) -> int:
        return len(self.log)


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"The '{name}' parameter must be an integer >= 0. Got {value!r} instead.")
    return int(value)


def fine_tune(learner, epochs: int | None = None, lr: float | None = None, freeze_epochs: int | None = None,
              seed: int | None = None, progress: bool = True, lr_mult: float | None = None,
              freeze_lr: float | None = None, wise_ft: bool = False) -> FineTuneResult:
    """fastai one-cycle fine-tuning: ``freeze_epochs`` with the body frozen, then ``epochs``
    with everything training (the body at ``lr / lr_mult``, the head at ``lr``).

    Arguments left None come from the recipe of the learner's head (``heads.RECIPES``,
    README "Quality"); softmax: no frozen epochs, 8 with the body at 4e-4 and the head at
    2e-3 (a frozen warm-up, kept for the unfrozen phase, lowered the test MAP@R). fastai's
    defaults (1 frozen epoch, body at lr / 100) left the embedding close to the ImageNet one.

    Args:
        learner: from :func:`create_learner`.
        epochs: unfrozen epochs.
        lr: the head's learning rate once unfrozen (``learner.lr_find()`` suggests one).
        freeze_epochs: epochs with only the head training.
        seed: the training order and augmentation; default the learner's seed.
        progress: fastai's progress bars.
        lr_mult: the body learns ``lr_mult`` times slower than the head once unfrozen.
        freeze_lr: the learning rate of the frozen epochs (fastai's own choice is ``2 * lr``).
        wise_ft: then interpolate the body between its starting and its best weights, the
            mixing weight chosen by the retrieval validation (:func:`robust.wise_ft`).

    Returns:
        A :class:`FineTuneResult`; the learner's model holds the weights of its best epoch.
    """
    net = learner.model
    if not isinstance(net, SimilarityNet):
        raise TypeError("fine_tune needs a Learner from train.create_learner (its model is a SimilarityNet).")
    defaults = recipe(net.config.get("head"))
    epochs = _count("epochs", defaults["epochs"] if epochs is None else epochs)
    freeze_epochs = _count("freeze_epochs", defaults["freeze_epochs"] if freeze_epochs is None else freeze_epochs)
    lr = defaults["lr"] if lr is None else lr
    lr_mult = defaults["lr_mult"] if lr_mult is None else lr_mult
    freeze_lr = defaults["freeze_lr"] if freeze_lr is None else freeze_lr
    seed = net.config.get("seed", 0) if seed is None else seed
    start = time.perf_counter()
    ctx = contextlib.nullcontext() if progress else learner.no_bar()
    cb = retrieval_validation(learner)
    one_run = cb.one_run() if cb is not None else contextlib.nullcontext()
    with _seeded(seed), ctx, one_run:  # one validation over both phases: the warm-up is kept
        if freeze_epochs > 0:
            learner.freeze()
            learner.fit_one_cycle(freeze_epochs, freeze_lr)
        learner.unfreeze()
        if epochs > 0:
            learner.fit_one_cycle(epochs, slice(lr / lr_mult, lr), pct_start=0.3, div=5.0)
    wise = robust.wise_ft(learner) if wise_ft else None
    if cb is None:
        return FineTuneResult([], seconds=time.perf_counter() - start)
    return FineTuneResult([dict(h) for h in cb.history], best_epoch=cb.best_epoch,
                          best_score=None if cb.best_epoch is None else cb.best_score, skipped=list(cb.skipped),
                          seconds=time.perf_counter() - start, wise_alpha=wise.alpha if wise else None,
                          wise_scores=wise.scores if wise else {})


# ---------------------------------------------------------------------------- using
def embedding_model(learner) -> tuple[nn.Module, Callable]:
    """``(module, transform)`` for ``features.extract_features``: the penultimate pooled
    features (softmax) or the normalised embedding (NormSoftmax), in eval mode.

    The module wraps a copy of the learner's network (a snapshot: later training does not
    change it, and the learner's model keeps its own train / eval mode).
    """
    net = learner.model if hasattr(learner, "model") else learner
    if not isinstance(net, SimilarityNet):
        raise TypeError("embedding_model needs a Learner from train.create_learner (its model is a SimilarityNet).")
    return EmbeddingModel(copy.deepcopy(net)).eval(), net.transform
