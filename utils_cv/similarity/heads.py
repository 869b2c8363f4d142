"""Embedding heads, losses and the training recipes: open registries, no if-chains.

A *head* turns the backbone's pooled features into the embedding (its ``neck``) and the
embedding into what the loss takes (its ``classifier``: class logits for the softmax family,
the identity for pair-based losses). A head is registered once by name with
:func:`register_head`; a *loss* likewise with :func:`register_loss`. Everything else
(``train.create_learner``, ``checkpoint.load``, ``experiment``, the command line) looks them up,
so a new loss or head (ArcFace, a triplet loss with a miner) is one new entry here or in the
user's code, not edits in several modules.

Built-in heads, as in "Classification is a Strong Baseline for Deep Metric Learning" (Zhai &
Wu, BMVC 2019):

* ``softmax``: pooled features -> dropout -> linear classifier; the embedding is the pooled
  features (the penultimate representation).
* ``normsoftmax``: pooled features -> LayerNorm (no affine) -> linear to ``embedding_dim``
  -> cosine classifier / temperature; the embedding is the L2-normalised linear output.
* ``metric``: the same neck, the normalised embedding itself to a metric-learning loss from
  pytorch-metric-learning (``triplet`` with semi-hard mining as in FaceNet, ``multisimilarity``
  with its miner, ``proxyanchor``, ``arcface``; any of them with ``loss=``), on batches of 4
  images per class.

:data:`RECIPES` is the one place the measured training defaults live (README, "Quality"):
``train.create_learner`` / ``train.fine_tune`` fill their unset arguments from the entry of
their head, and ``experiment`` and the command line read the same mapping.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from utils_cv.similarity.model import num_features

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_HEAD",
    "HEADS",
    "LOSSES",
    "RECIPES",
    "EmbeddingModel",
    "HeadParts",
    "MetricLoss",
    "SimilarityNet",
    "create_loss",
    "recipe",
    "register_head",
    "register_loss",
]

DEFAULT_HEAD = "softmax"

# Measured on the default data set (README, "Quality"). Each key is a ``train.create_learner``
# (backbone, image_size, embedding_dim) or ``train.fine_tune`` (the rest) argument. Read-only:
# copy an entry (``dict(RECIPES["softmax"])``) to vary it.
RECIPES = MappingProxyType({
    "softmax": MappingProxyType(dict(backbone="efficientnet_lite0", image_size=160, freeze_epochs=0, epochs=8,
                                     freeze_lr=1e-2, lr=2e-3, lr_mult=5, embedding_dim=None)),
    "normsoftmax": MappingProxyType(dict(backbone="efficientnet_lite0", image_size=160, freeze_epochs=3, epochs=8,
                                         freeze_lr=1e-2, lr=2e-3, lr_mult=10, embedding_dim=512)),
    # NormSoftmax's recipe, with which the metric-learning losses were measured (not tuned for them)
    "metric": MappingProxyType(dict(backbone="efficientnet_lite0", image_size=160, freeze_epochs=3, epochs=8,
                                    freeze_lr=1e-2, lr=2e-3, lr_mult=10, embedding_dim=512)),
})
LEARNER_KEYS = ("backbone", "image_size", "embedding_dim")
FIT_KEYS = ("epochs", "freeze_epochs", "freeze_lr", "lr", "lr_mult")


def recipe(head: str | None) -> dict:
    """The recipe of ``head`` (a copy); heads without a measured recipe get the default head's."""
    return dict(RECIPES.get(head, RECIPES[DEFAULT_HEAD])) if isinstance(head, str) else dict(RECIPES[DEFAULT_HEAD])


@dataclass(frozen=True)
class HeadParts:
    """What a head factory returns.

    Attributes:
        neck: (B, width) pooled features -> (B, embedding_dim) embedding (before normalisation).
        classifier: embedding -> what the loss takes ((B, n_classes) logits, or the embedding).
        embedding_dim: the embedding's width.
        normalize: the embedding is L2-normalised (``embed`` applies it).
        loss: the registered name of the loss used when ``create_learner(loss=None)``.
        logits: ``classifier`` gives class logits (fastai then also reports accuracy).
        balanced_batches: train on class-balanced batches (each image drawn with weight
            1 / its class size) rather than shuffled ones.
        m_per_class: train on batches made of groups of this many images of one class (what
            pair-based losses and their miners need: positives in every batch); 0: off.
    """

    neck: nn.Module
    classifier: nn.Module
    embedding_dim: int
    normalize: bool = False
    loss: str = "cross_entropy"
    logits: bool = True
    balanced_batches: bool = False
    m_per_class: int = 0


HeadFactory = Callable[..., HeadParts]
HEADS: dict[str, HeadFactory] = {}
LOSSES: dict[str, Callable[..., Callable]] = {}


def _register(table: dict, kind: str, name: str, overwrite: bool):
    if not isinstance(name, str) or not name:
        raise ValueError(f"A {kind} name must be a non-empty string. Got {name!r} instead.")

    def decorator(factory):
        if not callable(factory):
            raise TypeError(f"register_{kind}({name!r}) decorates a callable; got {type(factory).__name__}.")
        if name in table and not overwrite and table[name] is not factory:
            raise ValueError(f"A {kind} named {name!r} is already registered; pass overwrite=True to replace it.")
        table[name] = factory
        return factory

    return decorator


def register_head(name: str, overwrite: bool = False):
    """Decorator registering a head factory under ``name``.

    The factory is called as ``factory(width, n_classes, *, embedding_dim, temperature,
    dropout)`` (it may ignore the options it has no use for) and returns :class:`HeadParts`.
    """
    return _register(HEADS, "head", name, overwrite)


def register_loss(name: str, overwrite: bool = False):
    """Decorator registering a loss factory under ``name``.

    The factory is called as ``factory(n_classes=..., embedding_dim=...)`` and returns a
    callable ``loss(output, target) -> scalar tensor`` (``output`` is what the head's
    classifier returns). A loss that is an ``nn.Module`` with parameters (proxies, class
    centres) gets them trained with the head.
    """
    return _register(LOSSES, "loss", name, overwrite)


def _unknown(kind: str, table: dict, name) -> ValueError:
    return ValueError(f"The '{kind}' parameter must be one of {sorted(table)} (or a {kind} factory / object; "
                      f"register new ones with heads.register_{kind}). Got {name!r} instead.")


def head_factory(head: str | HeadFactory) -> tuple[str, HeadFactory]:
    """``(name, factory)`` for a registered name or a factory callable."""
    if isinstance(head, str):
        if head not in HEADS:
            raise _unknown("head", HEADS, head)
        return head, HEADS[head]
    if callable(head):
        return getattr(head, "name", None) or getattr(head, "__name__", type(head).__name__), head
    raise _unknown("head", HEADS, head)


def create_loss(loss, n_classes: int, embedding_dim: int, default: str = "cross_entropy"):
    """The loss callable for ``loss``: None (the head's ``default``), a registered name, or a
    callable used as it is."""
    if loss is None:
        loss = default
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise _unknown("loss", LOSSES, loss)
        return LOSSES[loss](n_classes=n_classes, embedding_dim=embedding_dim)
    if callable(loss):
        return loss
    raise _unknown("loss", LOSSES, loss)


# ---------------------------------------------------------------------------- built-ins
class CosineClassifier(nn.Module):
    """Logits = cos(embedding, class weight) / temperature."""

    def __init__(self, dim: int, n_classes: int, temperature: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) * 0.01)
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1)) / self.temperature


@register_head("softmax")
def softmax_head(width: int, n_classes: int, *, embedding_dim: int | None = None, temperature: float = 0.05,
                 dropout: float = 0.2) -> HeadParts:
    """The penultimate pooled features as the embedding; ``embedding_dim`` does not apply."""
    neck = nn.Identity()
    classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, n_classes))
    return HeadParts(neck, classifier, embedding_dim=width)


@register_head("normsoftmax")
def normsoftmax_head(width: int, n_classes: int, *, embedding_dim: int | None = None, temperature: float = 0.05,
                     dropout: float = 0.2) -> HeadParts:
    """LayerNorm + linear to ``embedding_dim`` (default 512), cosine classifier / temperature."""
    dim = int(embedding_dim or 512)
    # creation order (neck, then the classifier) fixes what a seeded initialisation draws
    neck = nn.Sequential(nn.LayerNorm(width, elementwise_affine=False), nn.Linear(width, dim))
    return HeadParts(neck, CosineClassifier(dim, n_classes, temperature), embedding_dim=dim, normalize=True,
                     balanced_batches=True)


@register_loss("cross_entropy")
def cross_entropy_loss(n_classes: int, embedding_dim: int):
    """fastai's flattened cross-entropy (its ``decodes`` / ``activation`` serve ``predict``)."""
    from fastai.losses import CrossEntropyLossFlat  # fastai only when a Learner is being built

    return CrossEntropyLossFlat()


# ---------------------------------------------------------------------------- metric learning
@register_head("metric")
def metric_head(width: int, n_classes: int, *, embedding_dim: int | None = None, temperature: float = 0.05,
                dropout: float = 0.2) -> HeadParts:
    """For metric-learning losses: LayerNorm + linear to ``embedding_dim`` (default 512), the
    L2-normalised embedding itself goes to the loss (default ``multisimilarity``), batches of
    4 images per class."""
    dim = int(embedding_dim or 512)
    neck = nn.Sequential(nn.LayerNorm(width, elementwise_affine=False), nn.Linear(width, dim))
    return HeadParts(neck, _Normalize(), embedding_dim=dim, normalize=True, loss="multisimilarity", logits=False,
                     m_per_class=4)


class _Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1)


class MetricLoss(nn.Module):
    """A pytorch-metric-learning loss (and miner) as ``loss(embeddings, labels)``; its own
    parameters (proxies, class centres) are trained with the head."""

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None):
        super().__init__()
        self.loss, self.miner = loss, miner

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        output = output.as_subclass(torch.Tensor).float()  # fastai's tensor subclasses, amp's float16
        target = target.as_subclass(torch.Tensor).long().view(-1)
        return self.loss(output, target, self.miner(output, target) if self.miner is not None else None)


def _pml():
    try:
        from pytorch_metric_learning import losses, miners
    except ImportError as exc:
        raise ImportError("Metric-learning losses need pytorch-metric-learning: pip install 'utils_cv[metric]' "
                          "(or pip install pytorch-metric-learning).") from exc
    return losses, miners


@register_loss("triplet")
def triplet_loss(n_classes: int, embedding_dim: int):
    """FaceNet's triplet loss (margin 0.2) on semi-hard triplets of the batch."""
    losses, miners = _pml()
    return MetricLoss(losses.TripletMarginLoss(margin=0.2), miners.TripletMarginMiner(margin=0.2,
                                                                                      type_of_triplets="semihard"))


@register_loss("multisimilarity")
def multisimilarity_loss(n_classes: int, embedding_dim: int):
    """Multi-similarity loss (alpha 2, beta 50, base 0.5) with its pair miner (epsilon 0.1)."""
    losses, miners = _pml()
    return MetricLoss(losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5), miners.MultiSimilarityMiner(0.1))


@register_loss("proxyanchor")
def proxyanchor_loss(n_classes: int, embedding_dim: int):
    """Proxy-Anchor loss (margin 0.1, alpha 32): one learned proxy per class."""
    losses, _ = _pml()
    return MetricLoss(losses.ProxyAnchorLoss(n_classes, embedding_dim, margin=0.1, alpha=32))


@register_loss("arcface")
def arcface_loss(n_classes: int, embedding_dim: int):
    """ArcFace (additive angular margin 28.6 degrees, scale 64) with learned class centres."""
    losses, _ = _pml()
    return MetricLoss(losses.ArcFaceLoss(n_classes, embedding_dim, margin=28.6, scale=64))


# ---------------------------------------------------------------------------- the network
class SimilarityNet(nn.Module):
    """Backbone + head. ``forward`` gives what the loss takes (class logits for the softmax
    family), ``embed`` the embedding.

    The network also carries what it needs to be used and saved (``transform``: its eval
    preprocessing; ``config``: backbone, head, classes, sizes...), so no state has to be kept
    on a fastai Learner.
    """

    def __init__(self, body: nn.Module, n_classes: int, head: str | HeadFactory = DEFAULT_HEAD,
                 embedding_dim: int | None = None, temperature: float = 0.05, dropout: float = 0.2,
                 transform: Callable | None = None, config: dict | None = None):
        super().__init__()
        name, factory = head_factory(head)
        self.body = body
        width = int(num_features(body))
        parts = factory(width, n_classes, embedding_dim=embedding_dim, temperature=temperature, dropout=dropout)
        if not isinstance(parts, HeadParts):
            raise TypeError(f"The head factory {name!r} must return heads.HeadParts; got {type(parts).__name__}.")
        self.head_name = name
        self.neck, self.classifier = parts.neck, parts.classifier
        self.embedding_dim = int(parts.embedding_dim)
        self.normalize = bool(parts.normalize)
        self.default_loss, self.logits = parts.loss, bool(parts.logits)
        self.balanced_batches = bool(parts.balanced_batches)
        self.m_per_class = int(parts.m_per_class)
        self.transform = transform
        self.config = dict(config or {})
        self.reference, self.reference_weight, self._own_dim = None, 0.0, self.embedding_dim
        self.n_classes, self.score_weight = int(n_classes), 0.0

    def set_reference(self, body: nn.Module, weight: float) -> None:
        """Embed with ``body`` (a frozen network, e.g. the starting ImageNet one) beside the
        trained one: the embedding becomes ``[sqrt(1 - weight) * e, sqrt(weight) * r]`` of the
        two L2-normalised outputs, so squared L2 distances mix as ``(1 - weight) * trained +
        weight * reference`` (``robust.output_ensemble``); ``config["ensemble_weight"]`` records
        ``weight`` so that ``checkpoint.load`` rebuilds it."""
        if not 0.0 < float(weight) <= 1.0:
            raise ValueError(f"The 'weight' parameter must be in (0, 1]. Got {weight!r} instead.")
        if self.reference is not None:  # replaced: the trained part's width is what stays
            self.embedding_dim -= int(num_features(self.reference))
        self.reference, self.reference_weight = body.eval().requires_grad_(False), float(weight)
        self.embedding_dim += int(num_features(body))
        self.config["ensemble_weight"] = float(weight)

    def set_score_weight(self, weight: float) -> None:
        """Embed ``[sqrt(1 - weight) * e, sqrt(weight) * s]`` of the L2-normalised embedding ``e`` and
        the L2-normalised, centred class logits ``s``: squared L2 distances mix as ``(1 - weight) *
        features + weight * class scores`` (``robust.class_scores``; 1: the class scores alone, 0: the
        embedding as it was). Recorded in ``config["score_weight"]``; set before :meth:`set_reference`."""
        loss = self.config.get("loss", self.default_loss)
        if not self.logits or loss != self.default_loss:  # a metric loss on the logits makes them an embedding
            raise ValueError(f"The {self.head_name!r} head trained with loss {loss!r} gives no class logits: class "
                             "scores cannot be embedded.")
        if self.reference is not None:
            raise ValueError("Set the class-score weight before the starting network is kept beside the model "
                             "(robust.class_scores before robust.output_ensemble).")
        if not 0.0 <= float(weight) <= 1.0:
            raise ValueError(f"The 'weight' parameter must be in [0, 1]. Got {weight!r} instead.")
        self.score_weight = self.config["score_weight"] = w = float(weight)
        self.embedding_dim = self._own_dim if w == 0.0 else self.n_classes if w == 1.0 else self._own_dim + self.n_classes

    def extra_repr(self) -> str:  # in the repr, so that exported and prepared copies tell the mixes apart
        return f"score_weight={self.score_weight}, reference_weight={self.reference_weight}"

    def class_scores(self, z: torch.Tensor) -> torch.Tensor:
        """The class-score part of the embedding: the L2-normalised class logits of neck outputs
        ``z``, centred (an offset all logits share says nothing about the class)."""
        logits = self.classifier(z)
        return F.normalize(logits - logits.mean(dim=1, keepdim=True), dim=1)

    def train(self, mode: bool = True) -> "SimilarityNet":
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # frozen, batch-norm statistics included
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        z = self.neck(self.body(x))
        w = self.score_weight
        if w > 0.0:
            s = self.class_scores(z)
            z = s if w == 1.0 else torch.cat([F.normalize(z, dim=1) * (1.0 - w) ** 0.5, s * w ** 0.5], dim=1)
        if self.reference is not None:
            w = self.reference_weight
            return torch.cat([F.normalize(z, dim=1) * (1.0 - w) ** 0.5, F.normalize(self.reference(x), dim=1) * w ** 0.5],
                             dim=1)
        return F.normalize(z, dim=1) if self.normalize or w > 0.0 else z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.neck(self.body(x)))


class EmbeddingModel(nn.Module):
    """The embedding half of a :class:`SimilarityNet` as a plain module (no hooks): maps
    (B, 3, H, W) to (B, embedding_dim), what ``features.extract_features`` takes."""

    def __init__(self, net: SimilarityNet):
        super().__init__()
        self.net = net
        # timm's convention (no classifier: num_classes 0, output width num_features), which
        # model.num_features reads
        self.num_classes = 0

    @property
    def num_features(self) -> int:  # follows the network's class-score and starting-network settings
        return self.net.embedding_dim

    feature_dim = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.embed(x)
