"""WiSE-FT: weight-space ensembles of the fine-tuned and the starting network, and the other
choices the retrieval validation makes after training.

Fine-tuning on a few classes teaches features for those classes and can unlearn some of what
made the ImageNet features good on others (README "Quality": on the openclipart classes it
never saw, the fine-tuned softmax model has a lower recall@1 than the features it started from).
WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022) interpolates
the two sets of weights, ``(1 - alpha) * start + alpha * fine-tuned``, which keeps much of
both; here ``alpha`` is chosen by the learner's retrieval validation, like the best epoch.

Only the pretrained body is interpolated: the head's layers did not exist before training
(their starting values are a random initialisation), so they keep their fine-tuned weights.
``alpha = 0`` gives the starting body back (the ImageNet features for the softmax head, whose
embedding is the body's pooled output); ``alpha = 1`` the fine-tuned model.

:func:`output_ensemble` is the output-space counterpart (the baseline WiSE-FT is compared with):
the starting network is kept beside the fine-tuned one and the two L2-normalised embeddings are
concatenated with weights ``sqrt(1 - w)`` and ``sqrt(w)``, so that squared distances mix as
``(1 - w) * fine-tuned + w * starting``; ``w`` is chosen by the retrieval validation. It costs a
second forward pass and a wider embedding; measured on openclipart's unseen classes it keeps the
ImageNet features' recall@1 where the fine-tuned model alone loses some (README "Quality").

:func:`class_scores` mixes the fine-tuned classifier's class scores into the embedding, with the
weight the validation chooses: for a collection of the classes the model was trained on they
group each class more tightly than the features do (README "Quality"). On classes it never saw
they did not help, and a validation of 3 held-out classes still kept small weights: leave them
out when the model will search other classes.

:func:`choose_rerank` lets the same validation pick k-reciprocal re-ranking's parameters
(:func:`utils_cv.similarity.rerank.choose_parameters`) for the model as it now embeds.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from utils_cv.similarity import metrics, rerank
from utils_cv.similarity import model as model_mod
from utils_cv.similarity.callbacks import retrieval_validation
from utils_cv.similarity.loading import transform_config

__all__ = ["ALPHAS", "WEIGHTS", "EnsembleResult", "ScoreResult", "WiseResult", "check_class_scores", "choose_rerank",
           "class_scores", "interpolate", "output_ensemble", "wise_ft"]

logger = logging.getLogger(__name__)

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the mixing weights tried by default
WEIGHTS = tuple(i / 10 for i in range(11))  # output_ensemble: the starting network's weights tried


@dataclass
class WiseResult:
    """The mixing weight the model now holds and the validation MAP@R of each weight tried."""

    alpha: float
    scores: dict


def interpolate(start: dict, end: dict, alpha: float, prefix: str = "body.") -> dict:
    """The state ``end`` with each floating-point entry under ``prefix`` that ``start`` also
    has replaced by ``(1 - alpha) * start + alpha * end`` (integer buffers, e.g. batch-norm
    counters, and the other entries keep ``end``'s)."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"The 'alpha' parameter must be in [0, 1]. Got {alpha!r} instead.")
    out = {}
    for name, value in end.items():
        before = start.get(name)
        if (name.startswith(prefix) and before is not None and value.is_floating_point()
                and before.shape == value.shape):
            out[name] = torch.lerp(before.to(value.dtype), value, float(alpha))
        else:
            out[name] = value
    return out


def wise_ft(learner, alphas: Sequence[float] = ALPHAS) -> WiseResult:
    """Interpolate the learner's body between its weights before training and now, keep the
    mixing weight with the best validation MAP@R (ties: the larger weight, the model as
    trained) and return it with every weight's score.

    Raises:
        ValueError: the learner has no retrieval validation (create it with validation images)
            or has not trained yet; an alpha outside [0, 1].
    """
    alphas = sorted({float(a) for a in alphas})
    if not alphas or alphas[0] < 0.0 or alphas[-1] > 1.0:
        raise ValueError(f"The 'alphas' parameter must hold values in [0, 1]. Got {list(alphas)!r} instead.")
    cb = _validation_checked(learner, "wise_ft")
    model = learner.model
    end = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scores = {}
    for a in alphas:
        if a == 1.0 and cb.best_state is not None and cb.best_epoch is not None and _same(end, cb.best_state):
            scores[a] = cb.best_score  # the restored best epoch: already measured
            continue
        model.load_state_dict(interpolate(cb.start_state, end, a))
        scores[a] = cb.score()
    best = max(alphas, key=lambda a: (scores[a], a))
    model.load_state_dict(interpolate(cb.start_state, end, best))
    logger.info("WiSE-FT: validation MAP@R %s; kept alpha %.2f",
                ", ".join(f"{a:.2f}: {s:.4f}" for a, s in scores.items()), best)
    return WiseResult(best, scores)


@dataclass
class EnsembleResult:
    """The starting network's weight in the embedding (0: the fine-tuned model alone, as it
    was) and the validation MAP@R of each weight tried."""

    weight: float
    scores: dict


def _validation(learner, what: str):
    cb = retrieval_validation(learner)
    if cb is None or not cb.measures:
        raise ValueError(f"{what} chooses its weight by the retrieval validation: create the learner with "
                         "validation images (train.create_learner(..., valid=0.2)), 2 or more of a class.")
    return cb


def _validation_checked(learner, what: str):
    cb = _validation(learner, what)
    if cb.start_state is None:
        raise ValueError(f"{what} needs the weights before training: fine-tune first.")
    return cb


def output_ensemble(learner, weights: Sequence[float] = WEIGHTS, image_size: int | None = None) -> EnsembleResult:
    """Keep the starting network beside the fine-tuned one, with the weight (in ``weights``)
    that gives the best validation MAP@R (ties: the smaller weight), and return it with every
    weight's score. Weight 0 leaves the networks as they are; otherwise ``learner.model``
    embeds with both (:meth:`~utils_cv.similarity.heads.SimilarityNet.set_reference`), is
    saved and loaded so, and its ``embedding_dim`` is the sum of both widths.

    The validation features of each network are computed once and mixed for every weight.
    Hold out classes for the validation (``create_learner(..., valid=(paths, labels))``) when
    the model will search classes it was not trained on: with images of the training classes
    the validation favours the fine-tuned network.

    Args:
        learner: fine-tuned, with a retrieval validation.
        weights: the starting network's weights to try, in [0, 1].
        image_size: the input side both networks embed from now on (the model's transform
            and saved ``image_size`` change to it; ``trained_image_size`` keeps the training
            one); None keeps the model's. ImageNet networks retrieve best at their own size
            (224 px for EfficientNet-Lite0, README "Quality").

    Raises:
        ValueError: no retrieval validation, not trained yet, the model already holds a
            starting network, or a weight outside [0, 1].
    """
    weights = sorted({float(w) for w in weights})
    if not weights or weights[0] < 0.0 or weights[-1] > 1.0:
        raise ValueError(f"The 'weights' parameter must hold values in [0, 1]. Got {list(weights)!r} instead.")
    cb = _validation_checked(learner, "output_ensemble")
    net = learner.model
    if net.reference is not None:
        raise ValueError("The model already embeds with its starting network (output_ensemble was applied).")
    start = copy.deepcopy(net.body)
    start.load_state_dict({k[len("body."):]: v for k, v in cb.start_state.items() if k.startswith("body.")})
    if image_size is not None and int(image_size) != net.config.get("image_size"):
        transform = model_mod.create_backbone(net.config["backbone"], pretrained=False, image_size=int(image_size))[1]
        net.transform = transform
        cb.use_transform(transform)  # the validation measures the model as it now embeds
        net.config.update(trained_image_size=net.config.get("trained_image_size", net.config.get("image_size")),
                          image_size=int(image_size), preprocessing=transform_config(transform))

    trained, reference = cb.features(), cb.features(start.eval())
    scores = {}
    for w in weights:
        mixed = np.hstack([np.sqrt(1.0 - w) * trained, np.sqrt(w) * reference]).astype(np.float32)
        scores[w] = metrics.evaluate_retrieval(mixed, cb.val_labels, ks=(1,))["map@r"]
    best = max(weights, key=lambda w: (scores[w], -w))
    if best > 0.0:
        net.set_reference(start, best)
        extra = {f"reference.{k}": v for k, v in net.reference.state_dict().items()}
        for state in (cb.best_state, cb.start_state):  # a later restore loads whole states
            if state is not None:
                state.update(copy.deepcopy(extra))
    logger.info("output ensemble: validation MAP@R %s; kept weight %.2f",
                ", ".join(f"{w:.2f}: {s:.4f}" for w, s in scores.items()), best)
    return EnsembleResult(best, scores)


@dataclass
class ScoreResult:
    """The class scores' weight in the embedding (0: the features alone, as they were) and the
    validation MAP@R of each weight tried."""

    weight: float
    scores: dict


def class_scores(learner, weights: Sequence[float] = WEIGHTS) -> ScoreResult:
    """Mix the class scores into the embedding with the weight (in ``weights``) that gives the
    best validation MAP@R (ties: the smaller weight), and return it with every weight's score.
    Weight 0 leaves the model as it is; otherwise ``learner.model`` embeds ``[sqrt(1 - w) * e,
    sqrt(w) * s]`` (:meth:`~utils_cv.similarity.heads.SimilarityNet.set_score_weight`: ``e`` the
    normalised embedding, ``s`` the normalised, centred class logits) and is saved and loaded so.

    The class scores place an image among the classes the model was trained on: with the
    validation images of those classes (``valid=0.2``, the default) they usually win, which suits a
    collection of those classes. Hold out classes for the validation (``valid=(paths, labels)``)
    when the model will search other classes, so that the validation judges them there. Apply
    before :func:`output_ensemble`.

    Args:
        learner: fine-tuned, with a retrieval validation; its head gives class logits
            (softmax, NormSoftmax).
        weights: the class scores' weights to try, in [0, 1].

    Raises:
        ValueError: no retrieval validation, not trained yet, a head without class logits, the
            starting network already kept beside the model, or a weight outside [0, 1].
    """
    weights = sorted({float(w) for w in weights})
    if not weights or weights[0] < 0.0 or weights[-1] > 1.0:
        raise ValueError(f"The 'weights' parameter must hold values in [0, 1]. Got {list(weights)!r} instead.")
    check_class_scores(learner)
    cb = _validation_checked(learner, "class_scores")
    net = learner.model
    before = net.score_weight
    try:  # the features alone, then the class scores alone; the weight held before comes back on an error
        net.set_score_weight(0.0)
        plain = cb.features()
        net.set_score_weight(1.0)
        scored = cb.features()
        unit = plain / np.maximum(np.linalg.norm(plain, axis=1, keepdims=True), 1e-12)
        scores = {}
        for w in weights:
            mixed = plain if w == 0.0 else np.hstack([np.sqrt(1.0 - w) * unit, np.sqrt(w) * scored]).astype(np.float32)
            scores[w] = metrics.evaluate_retrieval(mixed, cb.val_labels, ks=(1,))["map@r"]
    except BaseException:
        net.set_score_weight(before)
        raise
    best = max(weights, key=lambda w: (scores[w], -w))
    net.set_score_weight(best)
    logger.info("class scores: validation MAP@R %s; kept weight %.2f",
                ", ".join(f"{w:.2f}: {s:.4f}" for w, s in scores.items()), best)
    return ScoreResult(best, scores)


def check_class_scores(learner):
    """Raise the ValueError :func:`class_scores` would raise after training, before it: no
    retrieval validation, a head or loss without class logits, the starting network already kept
    beside the model (the command line checks before it trains). Returns the validation."""
    cb = _validation(learner, "class_scores")
    net = learner.model
    if not net.logits or net.config.get("loss", net.default_loss) != net.default_loss or net.reference is not None:
        net.set_score_weight(net.score_weight)  # raises, saying which
    return cb


def choose_rerank(learner, **grid) -> rerank.RerankChoice:
    """The k-reciprocal re-ranking parameters (:func:`utils_cv.similarity.rerank.choose_parameters`)
    that give the learner's retrieval validation images, embedded by its model as it is now,
    their best MAP@R; pass them on as ``rerank.k_reciprocal_rerank(features, **choice.params)``.
    With held-out classes in the validation (``create_learner(..., valid=(paths, labels))``) the
    choice is made on classes the model did not train on, like the ones it will search.

    Args:
        learner: with a retrieval validation (trained or not).
        grid: ``k1s``, ``k2s``, ``lambdas`` for ``choose_parameters`` (its defaults otherwise).

    Raises:
        ValueError: the learner has no retrieval validation.
    """
    cb = retrieval_validation(learner)
    if cb is None or not cb.measures:
        raise ValueError("choose_rerank scores the re-ranking on the retrieval validation: create the learner with "
                         "validation images (train.create_learner(..., valid=0.2)).")
    return rerank.choose_parameters(cb.features(), cb.val_labels, **grid)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
