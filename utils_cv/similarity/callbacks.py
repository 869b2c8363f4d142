"""fastai callbacks of the similarity training: the retrieval validation that keeps the best
weights, and frozen batch-norm statistics. :mod:`utils_cv.similarity.train` adds them to the
Learners it builds (see its docstring for why the validation is not fastai's
``SaveModelCallback``).
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Callable, Sequence

import warnings

with warnings.catch_warnings():
    # fastai decorates some layers with torch.jit.script, which this torch deprecates: a
    # FutureWarning at import that nobody using this library can act on
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    from fastai.callback.core import Callback


def fastai_vision():
    """``fastai.vision.all``, imported without fastai's import-time deprecation warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        import fastai.vision.all as fv
    return fv
from torch import nn

from utils_cv.similarity import features as features_mod
from utils_cv.similarity import metrics as metrics_mod
from utils_cv.similarity.heads import EmbeddingModel

logger = logging.getLogger(__name__)

__all__ = ["FrozenBatchNormStats", "RetrievalValidation", "retrieval_validation"]


class RetrievalValidation(Callback):
    """The per-epoch log (losses, accuracy, and the MAP@R of the validation images, measured
    before training too); the weights with the best MAP@R (epoch 0, the starting point,
    included) are restored at the end of a fit, or, inside :meth:`one_run`, once at the end of
    all the fits it holds (``train.fine_tune`` runs its warm-up and unfrozen phases as one run:
    the unfrozen phase starts from where the warm-up ended, and the best epoch is chosen over
    both phases).

    Args:
        paths, labels: the retrieval validation images (empty: log only, no MAP@R).
        transform: their eval preprocessing; None: the learner's ``SimilarityNet.transform``.
        batch_size: images per forward pass when embedding them.
        skipped: ``(path, reason)`` of images left out of training, reported with the log.
    """

    order = 60  # after the Recorder has logged the epoch

    def __init__(self, paths: Sequence = (), labels: Sequence[str] = (), transform: Callable | None = None,
                 batch_size: int = 32, skipped: Sequence = ()):
        super().__init__()
        self.val_paths, self.val_labels, self.transform = list(paths), list(labels), transform
        self.batch_size = batch_size
        self.skipped = list(skipped)
        self.history: list[dict] = []
        self.best_score, self.best_state, self.best_epoch = -1.0, None, None
        self.start_state = None  # the weights before training (epoch 0), for robust.wise_ft
        counts = {c: self.val_labels.count(c) for c in set(self.val_labels)}
        self.measures = bool(counts) and max(counts.values()) >= 2
        self.active = self.trained_in_fit = self.trained_in_epoch = False
        self.deferred = self.trained_since_restore = False

    def use_transform(self, transform: Callable) -> None:
        """Measure with ``transform`` from now on (the model embeds at another size,
        ``robust.output_ensemble(..., image_size=)``). Set through ``__dict__``: fastai warns on
        any callback attribute the learner also answers to, and the learner forwards
        ``transform`` to its model."""
        self.__dict__["transform"] = transform

    def features(self, model=None):
        """(n, d) features of the validation images, embedded by ``model`` (default: the
        learner's model as it is now) with the validation preprocessing."""
        net = self.learn.model
        transform = self.transform if self.transform is not None else net.transform
        return features_mod.extract_features(model if model is not None else EmbeddingModel(net), self.val_paths,
                                             transform, batch_size=self.batch_size, progress=False)

    def score(self) -> float:
        """MAP@R of the validation images with the learner's current weights."""
        return metrics_mod.evaluate_retrieval(self.features(), self.val_labels, ks=(1,))["map@r"]

    def _record(self, entry: dict) -> None:
        if self.measures:
            entry["map@r"] = score = self.score()
            if entry["epoch"] == 0:
                self.start_state = copy.deepcopy(self.learn.model.state_dict())
            if score > self.best_score:
                self.best_score, self.best_epoch = score, entry["epoch"]
                self.best_state = copy.deepcopy(self.learn.model.state_dict())
        shown = [f"{k.replace('_', ' ')} {v:.4f}" for k, v in entry.items() if k != "epoch" and isinstance(v, float)]
        logger.info("epoch %d%s: %s", entry["epoch"], " (before training)" if entry["epoch"] == 0 else "",
                    ", ".join(shown) or "trained")
        self.history.append(entry)

    # Learner.validate fires fit and epoch events too: only epochs that trained count
    def before_fit(self):
        self.trained_in_fit = False
        # lr_find trains with wild learning rates and restores the weights itself
        self.active = not hasattr(self.learn, "lr_finder")

    def before_epoch(self):
        self.trained_in_epoch = False

    def before_train(self):
        if not self.active:
            return
        if not self.history and self.measures:
            self._record({"epoch": 0})  # the starting point
        self.trained_in_fit = self.trained_in_epoch = True

    def after_epoch(self):
        if not self.trained_in_epoch:
            return
        entry = {"epoch": len(self.history) + (0 if self.measures else 1)}
        for name, value in zip(self.learn.recorder.metric_names, self.learn.recorder.log):
            if name not in ("epoch", "time"):
                with contextlib.suppress(TypeError, ValueError):
                    entry[name] = float(value)
        self._record(entry)

    def after_fit(self):
        self.trained_since_restore |= self.trained_in_fit
        if not self.deferred:
            self.restore_best()

    def restore_best(self) -> None:
        """Load the best weights seen since the last restore (nothing when nothing trained)."""
        if self.trained_since_restore and self.best_state is not None:
            self.learn.model.load_state_dict(self.best_state)
            logger.info("kept the weights of epoch %s (validation MAP@R %.4f)", self.best_epoch, self.best_score)
        self.trained_since_restore = False

    @contextlib.contextmanager
    def one_run(self):
        """Fits inside do not restore; the best weights over all of them are restored at the
        end (not when a fit raises: the model then holds the weights it had when it stopped,
        and a later fit or validate does not restore them either). Nested runs restore once,
        at the end of the outermost."""
        outer = self.deferred
        self.deferred = True
        try:
            yield self
        except BaseException:
            self.trained_since_restore = False
            raise
        finally:
            self.deferred = outer
        if not outer:
            self.restore_best()


class FrozenBatchNormStats(Callback):
    """Keep every batch norm in eval mode while training: the pretrained statistics stay as
    they are (small, augmented batches would drift them), the affine weights still train.

    Measured on the default data set (same-class split, seeds 0 and 1, test MAP@R; ImageNet
    features 0.482): statistics frozen throughout 0.627 / 0.631; adapted to the new images in
    the first epoch, then frozen 0.549 / 0.538. (An earlier recipe adapted them in the first
    epoch; it looked better only because the warm-up it belonged to was then thrown away.)"""

    order = 1  # after TrainEvalCallback has put the model in train mode

    def before_train(self):
        for m in self.learn.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def retrieval_validation(learner) -> RetrievalValidation | None:
    """The learner's :class:`RetrievalValidation` callback (None when it has none)."""
    return next((cb for cb in learner.cbs if isinstance(cb, RetrievalValidation)), None)
