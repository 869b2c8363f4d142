"""Inference-time folding of batch normalisation into the preceding convolution.

In eval mode a BatchNorm is a fixed per-channel affine map, so ``conv -> bn`` equals one
convolution with rescaled weights and a bias. Folding removes one full pass over every
activation map: EfficientNet-Lite0 on 2 CPU cores goes from about 60-70 to about 100 img/s
with features equal to 1e-5 (``benchmarks/bench_features.py``).

The new weights come from torch's own :func:`torch.nn.utils.fusion.fuse_conv_bn_eval`, and
the pairs are found in the traced graph (torch.fx), not in the order in which modules were
defined. torch's ready-made pass, :func:`torch.fx.experimental.optimization.fuse`, is not
used as is because it matches exact types: it leaves out timm's ``Conv2dSame`` (a
``Conv2d`` subclass whose padding depends on the input, used by every stride-2 layer of the
``tf_`` EfficientNets) and ``BatchNormAct2d`` (a ``BatchNorm2d`` subclass that also applies
its activation), so on the default backbone it folds well under half of the batch norms.
The pass here accepts subclasses and keeps a ``BatchNormAct2d``'s dropout and activation.
Tracing keeps whole the modules timm marks as not traceable (public
``timm.layers.get_notrace_modules``) and ``BatchNormAct2d``.

The folded copy is checked numerically against the original model; any model it cannot
trace, with nothing to fold, or whose output does not match is returned unchanged.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

logger = logging.getLogger(__name__)

__all__ = ["fold_batchnorm"]


def _bn_act_types() -> tuple[type, ...]:
    try:
        from timm.layers import BatchNormAct2d

        return (BatchNormAct2d,)
    except ImportError:  # pragma: no cover - timm is a dependency
        return ()


def _leaf_types() -> tuple[type, ...]:
    """Modules kept whole when tracing: timm's batch-norm+activation and the modules timm
    itself marks as not traceable."""
    leaves = list(_bn_act_types())
    try:
        from timm.layers import get_notrace_modules

        leaves += list(get_notrace_modules())
    except ImportError:  # pragma: no cover
        pass
    return tuple(leaves)


class _Tracer(fx.Tracer):
    def __init__(self, leaves: tuple[type, ...]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def _fold_pairs(graph_module: fx.GraphModule, bn_act: tuple[type, ...]) -> int:
    """Fold every ``Conv2d -> BatchNorm2d`` node pair in place; the number folded."""
    modules = dict(graph_module.named_modules())
    folded = 0
    for node in list(graph_module.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or bn.running_var is None:
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv = modules.get(src.target)
        if not isinstance(conv, nn.Conv2d) or conv.out_channels != bn.num_features:
            continue
        graph_module.add_submodule(src.target, fuse_conv_bn_eval(conv, bn))
        if bn_act and isinstance(bn, bn_act):  # keep what the module applies after normalising
            graph_module.add_submodule(node.target, nn.Sequential(bn.drop, bn.act))
        else:
            node.replace_all_uses_with(src)
            graph_module.graph.erase_node(node)
        folded += 1
    graph_module.graph.lint()
    graph_module.recompile()
    graph_module.delete_all_unused_submodules()
    return folded


def fold_batchnorm(model: nn.Module, example: torch.Tensor | None = None, atol: float = 1e-3) -> nn.Module:
    """A copy of ``model`` (eval mode) with every ``Conv2d -> BatchNorm2d`` pair folded.

    timm's ``BatchNormAct2d`` (batch norm + activation) keeps its activation. Returns the
    model itself, unchanged, when tracing fails, nothing folds, or the folded copy's output
    on ``example`` (default: a random 2x3x64x64 batch) differs by more than ``atol``. The
    model's own training flag is never changed: the reference output comes from an
    eval-mode copy.
    """
    bn_act = _bn_act_types()
    try:
        root = copy.deepcopy(model).eval()
        graph_module = fx.GraphModule(root, _Tracer(_leaf_types()).trace(root))
    except Exception as exc:  # noqa: BLE001 - any tracing failure means 'leave it alone'
        logger.debug("batch-norm folding skipped: %s cannot be traced (%s)", type(model).__name__, exc)
        return model
    try:
        folded = _fold_pairs(graph_module, bn_act)
    except Exception as exc:  # noqa: BLE001
        logger.debug("batch-norm folding skipped: %s", exc)
        return model
    if not folded:
        return model
    fused = graph_module
    fused.eval()
    for name in ("feature_dim", "num_features", "backbone_name"):
        if hasattr(model, name):
            setattr(fused, name, getattr(model, name))
    if example is None:
        example = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    param = next(model.parameters(), None)
    if param is not None:
        example = example.to(param.device)
    try:
        reference = copy.deepcopy(model).eval() if model.training else model
        with torch.inference_mode():
            ref, got = reference(example), fused(example)
        ok = ref.shape == got.shape and torch.allclose(ref, got, atol=atol, rtol=1e-3)
    except Exception as exc:  # noqa: BLE001
        logger.debug("batch-norm folding skipped: the folded model failed (%s)", exc)
        ok = False
    if not ok:
        logger.debug("batch-norm folding skipped: outputs differ")
        return model
    logger.debug("folded %d batch norms into their convolutions", folded)
    return fused
