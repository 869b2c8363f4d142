import torch
from torch import nn

from utils_cv.similarity import fuse, model


def _perturb_bn(net):
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net


def test_folding_keeps_outputs_and_removes_batchnorm_passes():
    for name in ("efficientnet_lite0", "resnet18"):
        net = _perturb_bn(model.create_backbone(name, pretrained=False)[0])
        folded = fuse.fold_batchnorm(net)
        assert folded is not net
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), net(x), atol=1e-4, rtol=1e-4)
        called = [n for n in folded.graph.nodes if n.op == "call_module"]
        bns = [n for n in called if isinstance(folded.get_submodule(n.target), nn.BatchNorm2d)]
        # timm's BatchNormAct2d and the Conv2dSame of the stride-2 layers are subclasses:
        # they fold too, not only exact (Conv2d, BatchNorm2d) pairs
        assert not bns, "every batch norm after a convolution is gone from the graph"
        assert folded.feature_dim == net.feature_dim


def test_untraceable_or_unfoldable_models_come_back_unchanged():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow cannot be traced
                return self.bn(self.conv(x))
            return self.conv(x)

    m = Dynamic().eval()
    assert fuse.fold_batchnorm(m) is m
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    assert fuse.fold_batchnorm(plain) is plain


def test_folding_uses_public_apis_and_leaves_the_model_as_it_was():
    import inspect

    assert "_features_fx" not in inspect.getsource(fuse)
    torch.manual_seed(0)  # the same weights and input every run: the bound below is float rounding, not luck
    net = _perturb_bn(model.create_backbone("efficientnet_lite0", pretrained=False, image_size=64)[0]).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fuse.fold_batchnorm(net)
    assert folded is not net and net.training and all(m.training for m in net.modules())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not folded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # float32 rounding through ~50 folded layers: a few 1e-5 at the worst of 2,560 outputs
        torch.testing.assert_close(folded(x), net.eval()(x), atol=5e-5, rtol=1e-4)
