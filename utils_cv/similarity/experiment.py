"""Train-and-evaluate runs, comparisons and sweeps: the loops behind notebooks 02 and 11
and ``benchmarks/bench_training_quality.py``, so that none of them lives in a notebook.

A *run* is one recipe (backbone, head, image size, epochs, learning rates) trained on one
set of images and evaluated by retrieval on another; it returns a flat dict of the recipe,
the metrics of ``metrics.evaluate_retrieval`` and the wall-clock seconds.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np

from utils_cv.similarity import boosts
from utils_cv.similarity import diffusion as diffusion_mod
from utils_cv.similarity import features as features_mod
from utils_cv.similarity import metrics
from utils_cv.similarity import model as model_mod
from utils_cv.similarity import rerank as rerank_mod
from utils_cv.similarity import robust, train
from utils_cv.similarity import heads
from utils_cv.similarity.heads import FIT_KEYS, HEADS, LEARNER_KEYS, RECIPES

__all__ = ["RECIPES", "compare", "disjoint_split", "evaluate", "imagenet_baseline", "run", "sweep", "table"]

log = logging.getLogger(__name__)

# RECIPES (re-exported) is heads.RECIPES: the one source of the measured defaults
_LEARNER_ARGS = set(LEARNER_KEYS) | {"batch_size", "temperature", "augment", "freeze_bn", "pretrained"}
_FIT_ARGS = set(FIT_KEYS)
METRIC_KEYS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")


def disjoint_split(paths: Sequence, labels: Sequence[str], test_classes: float = 0.5, valid_classes: float = 0.2,
                   seed: int = 0, by_name: bool = True) -> dict[str, tuple[list, list]]:
    """The disjoint-class protocol: ``train``, ``valid`` and ``test`` (paths, labels) with no
    class in common.

    The test classes are the last ``test_classes`` share by name (``by_name``, the convention
    of CUB-200 / Cars-196 / SOP) or a seeded random pick; ``valid_classes`` of the remaining
    classes (seeded) are held out of training to pick the best epoch by retrieval.
    """
    from utils_cv.similarity import data as data_mod

    paths, labels = list(paths), [str(l) for l in labels]
    tr, te = data_mod.split_by_class(paths, labels, test_classes=test_classes, seed=seed, by_name=by_name)
    p_tr, l_tr = [paths[i] for i in tr], [labels[i] for i in tr]
    fit, val = data_mod.split_by_class(p_tr, l_tr, test_classes=valid_classes, seed=seed)
    pick = lambda idx, xs: [xs[i] for i in idx]  # noqa: E731
    return {"train": (pick(fit, p_tr), pick(fit, l_tr)), "valid": (pick(val, p_tr), pick(val, l_tr)),
            "test": (pick(te, paths), pick(te, labels))}


def evaluate(net, transform, paths: Sequence, labels: Sequence[str], rerank: bool | dict = False,
             batch_size: int = 64, diffusion: bool | dict = False) -> dict:
    """Leave-one-out retrieval metrics of ``net``'s features over ``paths``.

    Args:
        rerank: also evaluate k-reciprocal re-ranked distances (``True`` for the paper's
            k1=20, k2=6, lambda 0.3, or a dict of those arguments); their metrics get the
            prefix ``"rerank "``.
        diffusion: also evaluate diffused distances (``diffusion.diffusion_distances``; ``True``
            for its defaults, or a dict of its arguments); their metrics get the prefix
            ``"diffusion "``.
    """
    feats = features_mod.extract_features(net, paths, transform, batch_size=batch_size, progress=False)
    result = metrics.evaluate_retrieval(feats, labels)
    if rerank:
        params = {} if rerank is True else dict(rerank)
        k1 = min(params.pop("k1", 20), len(feats) - 1)
        k2 = min(params.pop("k2", 6), k1 + 1)
        distances = rerank_mod.k_reciprocal_rerank(feats, None, k1=k1, k2=k2, **params)
        result.update({f"rerank {k}": v for k, v in metrics.evaluate_distances(distances, labels).items()})
    if diffusion:
        params = {} if diffusion is True else dict(diffusion)
        distances = diffusion_mod.diffusion_distances(feats, None, **params)
        result.update({f"diffusion {k}": v for k, v in metrics.evaluate_distances(distances, labels).items()})
    return result


def imagenet_baseline(paths: Sequence, labels: Sequence[str], backbone: str = "efficientnet_lite0",
                      rerank: bool | dict = False, diffusion: bool | dict = False) -> dict:
    """The backbone's ImageNet features (no training, its own preprocessing) evaluated as
    :func:`evaluate` does; the row every trained model is compared with."""
    start = time.perf_counter()
    net, transform = model_mod.create_backbone(backbone)
    result = {"model": f"ImageNet {backbone}", "backbone": backbone, "head": None,
              **evaluate(net, transform, paths, labels, rerank, diffusion=diffusion)}
    result["seconds"] = time.perf_counter() - start
    return result


def run(train_paths: Sequence, train_labels: Sequence[str], test_paths: Sequence, test_labels: Sequence[str],
        head: str = "softmax", seed: int = 0, valid: float | tuple = 0.2, rerank: bool | dict = False,
        name: str | None = None, loss: str | None = None, wise_ft: bool = False, keep_model: bool = False,
        ensemble: bool | int = False, class_scores: bool = False, diffusion: bool | dict = False,
        **recipe) -> dict:
    """Fine-tune one recipe and evaluate it on the test images.

    Args:
        head: a registered head (``heads.HEADS``: ``"softmax"``, ``"normsoftmax"``...); its
            entry of :data:`RECIPES` (``heads.RECIPES``) gives the defaults, ``recipe``
            overrides them (``backbone``, ``image_size``, ``epochs``, ``freeze_epochs``,
            ``lr``, ``freeze_lr``, ``lr_mult``, ``embedding_dim``, ``batch_size``,
            ``pretrained``...); a value of None keeps the recipe's.
        valid: ``create_learner``'s per-epoch retrieval validation (a share of the training
            images, or held-out ``(paths, labels)``).
        rerank: as in :func:`evaluate`, or ``"validation"``: the parameters that
            :func:`robust.choose_rerank` picks on the validation images (the row's
            ``rerank_params``).
        diffusion: as in :func:`evaluate`.
        name: the row's name (default: the head, and the loss when given).
        loss: a registered metric-learning loss for ``head="metric"`` (``heads.LOSSES``).
        wise_ft: finish with :func:`robust.wise_ft` (the body mixed with its starting weights).
        ensemble: finish with :func:`robust.output_ensemble` (the starting network kept beside
            the fine-tuned one, its weight chosen by the validation, the row's
            ``ensemble_weight``); an int also sets the input size both networks embed at
            (0 or False: no ensemble).
        class_scores: mix the class scores into the embedding with :func:`robust.class_scores`
            (before the ensemble; the row's ``score_weight``).
        keep_model: also return ``"embedding"``: the trained ``(module, transform)``.

    Returns:
        The recipe, the test metrics, ``train_seconds`` and ``seconds`` (training and
        evaluation), ``best_epoch`` and the training ``log``.
    """
    if head not in HEADS:
        raise ValueError(f"The 'head' parameter must be one of {sorted(HEADS)}. Got {head!r} instead.")
    unknown = set(recipe) - _LEARNER_ARGS - _FIT_ARGS
    if unknown:
        raise ValueError(f"Unknown recipe parameters {sorted(unknown)}; known: {sorted(_LEARNER_ARGS | _FIT_ARGS)}.")
    if isinstance(rerank, str) and rerank != "validation":
        raise ValueError(f"The 'rerank' parameter must be a bool, a dict or 'validation'. Got {rerank!r} instead.")
    if not isinstance(ensemble, bool) and (not isinstance(ensemble, (int, np.integer)) or ensemble < 0):
        raise ValueError(f"The 'ensemble' parameter must be a bool or an input size in pixels. Got {ensemble!r} instead.")
    if not isinstance(class_scores, bool):
        raise ValueError(f"The 'class_scores' parameter must be a bool. Got {class_scores!r} instead.")
    if head == "softmax" and recipe.get("embedding_dim") is not None:
        raise ValueError("'embedding_dim' applies to head='normsoftmax'; the softmax embedding is the backbone's width.")
    # a value of None keeps the recipe's
    config = {**heads.recipe(head), **{k: v for k, v in recipe.items() if v is not None}}
    start = time.perf_counter()
    learner = train.create_learner(train_paths, train_labels, head=head, seed=seed, valid=valid, loss=loss,
                                   **{k: v for k, v in config.items() if k in _LEARNER_ARGS})
    if class_scores:  # what would refuse them after training refuses them before
        robust.check_class_scores(learner)
    fit = {k: v for k, v in config.items() if k in _FIT_ARGS}
    fitted = train.fine_tune(learner, fit.pop("epochs"), progress=False, wise_ft=wise_ft, **fit)
    train_seconds = time.perf_counter() - start
    extra = {}
    if class_scores:
        extra["score_weight"] = robust.class_scores(learner).weight
    if ensemble:
        size = None if ensemble is True else int(ensemble)
        extra["ensemble_weight"] = robust.output_ensemble(learner, image_size=size).weight
    if isinstance(rerank, str):
        rerank = extra["rerank_params"] = robust.choose_rerank(learner).params
    net, transform = train.embedding_model(learner)
    result = {"model": name or (f"{head} {loss}" if loss else head), "head": head, "loss": loss, "seed": seed, **config,
              **evaluate(net, transform, test_paths, test_labels, rerank, diffusion=diffusion),
              "train_seconds": train_seconds, "seconds": time.perf_counter() - start, "log": list(fitted.log),
              "best_epoch": fitted.best_epoch, "wise_alpha": fitted.wise_alpha, **extra}
    if keep_model:
        result["embedding"] = (net, transform)
    log.info("%s: %s (%.0f s)", result["model"], ", ".join(f"{k} {result[k]:.3f}" for k in METRIC_KEYS),
             result["seconds"])
    return result


def compare(train_paths: Sequence, train_labels: Sequence[str], test_paths: Sequence, test_labels: Sequence[str],
            models: Sequence[tuple[str, str | None]] = (("softmax", None),), flip_tta: bool = True,
            rerank: bool | dict = False, diffusion: bool | dict = False, **run_args) -> list[dict]:
    """The ImageNet features and each ``(head, loss)`` of ``models`` trained by :func:`run`
    (``run_args``: seed, valid, recipe overrides), each also with flip test-time augmentation
    (``boosts.flip_model``, a row named ``"... + flip TTA"``) when ``flip_tta``; every row with
    and without re-ranking when ``rerank``, and diffused when ``diffusion``. The comparison of
    notebook 02."""
    post = dict(rerank=rerank, diffusion=diffusion)
    rows = [imagenet_baseline(test_paths, test_labels, **post)]
    if flip_tta:
        rows.append(_flipped(rows[0], *model_mod.create_backbone(), test_paths, test_labels, **post))
    for head, loss in models:
        row = run(train_paths, train_labels, test_paths, test_labels, head=head, loss=loss, keep_model=flip_tta,
                  **post, **run_args)
        embedding = row.pop("embedding", None)
        rows.append(row)
        if flip_tta:
            rows.append(_flipped(row, *embedding, test_paths, test_labels, **post))
    return rows


def _flipped(row: dict, net, transform, paths, labels, rerank, diffusion) -> dict:
    start = time.perf_counter()
    out = {"model": f"{row['model']} + flip TTA", "head": row.get("head"), "loss": row.get("loss"), "flip_tta": True,
           **evaluate(boosts.flip_model(net), transform, paths, labels, rerank, diffusion=diffusion)}
    out["seconds"] = time.perf_counter() - start
    return out


def sweep(train_paths: Sequence, train_labels: Sequence[str], test_paths: Sequence, test_labels: Sequence[str],
          grid: dict[str, Sequence], base: dict | None = None, head: str = "softmax", seed: int = 0,
          valid: float | tuple = 0.2) -> list[dict]:
    """One factor at a time: the base recipe once, then each value of each parameter of
    ``grid`` with every other parameter at its base value (values equal to the base are not
    run twice). Each row gets ``"varied"`` (the parameter changed, or ``"base"``).

    ``grid`` may include ``"head"`` (e.g. ``["softmax", "normsoftmax"]``).
    """
    if not grid:
        raise ValueError("The 'grid' parameter is empty: give {parameter: [values]}.")
    base = dict(base or {})
    base_head = base.pop("head", head)
    reference = {**heads.recipe(base_head), **base}
    rows = [{**run(train_paths, train_labels, test_paths, test_labels, head=base_head, seed=seed, valid=valid,
                   name="base", **base), "varied": "base"}]
    for param, values in grid.items():
        for value in values:
            if param == "head":
                if value == base_head:
                    continue
                recipe = {k: v for k, v in base.items() if k != "embedding_dim" or value == "normsoftmax"}
                row = run(train_paths, train_labels, test_paths, test_labels, head=value, seed=seed, valid=valid,
                          name=f"head={value}", **recipe)
            else:
                if reference.get(param) == value:
                    continue
                h = "normsoftmax" if param == "embedding_dim" and base_head == "softmax" else base_head
                row = run(train_paths, train_labels, test_paths, test_labels, head=h, seed=seed, valid=valid,
                          name=f"{param}={value}", **{**base, param: value})
            rows.append({**row, "varied": param})
    return rows


def table(rows: Sequence[dict], keys: Sequence[str] = METRIC_KEYS, extra: Sequence[str] = ()):
    """A pandas DataFrame of ``rows`` indexed by model name: the metric ``keys`` (and their
    ``rerank`` and ``diffusion`` versions when present) then ``extra`` columns."""
    import pandas as pd

    cols = list(keys) + [f"{post} {k}" for post in ("rerank", "diffusion") for k in keys
                         if any(f"{post} {k}" in r for r in rows)] + list(extra)
    frame = pd.DataFrame([{c: r.get(c, np.nan) for c in cols} for r in rows], index=[r["model"] for r in rows])
    return frame
