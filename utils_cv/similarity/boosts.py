"""Training-free improvements of retrieval, for collections without labels.

Each one works on features any backbone gives, needs no label, and composes with the others,
with :class:`~utils_cv.similarity.index.SimilarityIndex` and with re-ranking
(:mod:`~utils_cv.similarity.rerank`):

* :func:`flip_model`: test-time augmentation, the mean of an image's and its mirror image's
  pooled features (horizontal flips keep what a photo shows);
* :func:`gem_model`: generalised-mean (GeM) pooling of the last feature map instead of the
  mean (Radenović et al., TPAMI 2018): ``p > 1`` weighs the strongest activations more;
* :class:`PCAWhitening`: PCA whitening learned on the collection itself (fit on the gallery,
  applied to gallery and queries; ``SimilarityIndex.build(..., whitening=...)`` stores it and
  applies it to queries);
* :func:`database_augmentation` and :func:`query_expansion`: alpha-weighted query expansion
  (alpha-QE) and database-side augmentation (alpha-DBA): a vector is replaced by the
  normalised sum of itself and its nearest neighbours weighted by ``similarity ** alpha``.

``flip_model`` and ``gem_model`` return new modules (the caller's model is not changed), to
use with :class:`~utils_cv.similarity.features.FeatureExtractor` or ``extract_features``.
What each one is worth on the README's two protocols: ``benchmarks/bench_training_free.py``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from utils_cv.similarity.whitening import PCAWhitening, database_augmentation, query_expansion

__all__ = ["GeM", "PCAWhitening", "database_augmentation", "flip_model", "gem_model", "query_expansion"]


# ---------------------------------------------------------------------------- models
class _FlipMean(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x) + self.model(torch.flip(x, dims=[3]))) / 2


def flip_model(model: nn.Module) -> nn.Module:
    """A module giving the mean of ``model``'s output on the image and on its horizontal
    mirror (twice the compute). ``model`` is shared, not copied or changed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"The 'model' parameter must be a torch module. Got {type(model).__name__}.")
    return _FlipMean(model)


class GeM(nn.Module):
    """Generalised-mean pooling of (B, C, H, W) maps to (B, C): ``mean(x ** p) ** (1 / p)``
    over positions, activations clamped at ``eps`` (p = 1: average pooling; large p: max)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not p >= 1:
            raise ValueError(f"The 'p' parameter must be a number >= 1. Got {p!r} instead.")
        self.p, self.eps = float(p), float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


def gem_model(model: nn.Module, p: float = 3.0) -> nn.Module:
    """A copy of a timm backbone (``model.create_backbone``, or a module whose ``body`` is one)
    with GeM pooling in place of its global pooling; ``model`` itself is not changed."""
    out = copy.deepcopy(model)
    host = out if hasattr(out, "global_pool") else getattr(out, "body", None)
    if host is None or not hasattr(host, "global_pool"):
        raise ValueError("gem_model needs a timm backbone with a 'global_pool' layer (model.create_backbone), or a "
                         "module whose 'body' is one.")
    host.global_pool = GeM(p)
    return out.eval()
