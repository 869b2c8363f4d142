"""WiSE-FT: weight-space ensembles of the fine-tuned and the starting network.

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
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from utils_cv.similarity.callbacks import retrieval_validation

__all__ = ["ALPHAS", "WiseResult", "interpolate", "wise_ft"]

logger = logging.getLogger(__name__)

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the mixing weights tried by default


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
    cb = retrieval_validation(learner)
    if cb is None or not cb.measures:
        raise ValueError("wise_ft chooses the mixing weight by the retrieval validation: create the learner with "
                         "validation images (train.create_learner(..., valid=0.2)).")
    if cb.start_state is None:
        raise ValueError("wise_ft interpolates between the weights before and after training: fine-tune first.")
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


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
