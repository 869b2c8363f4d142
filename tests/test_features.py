import numpy as np
import pytest

from utils_cv.similarity import data, features, model


@pytest.fixture(scope="module")
def tiny_backbone():
    return model.create_backbone(pretrained=False, image_size=64)


def test_features_are_normalised_and_aligned(image_folder, tiny_backbone):
    net, transform = tiny_backbone
    paths, _ = data.list_images(image_folder)
    feats = features.extract_features(net, paths, transform, batch_size=5, num_workers=0, progress=False)
    assert feats.shape == (12, 1280) and feats.dtype == np.float32 and feats.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    again = features.extract_features(net, paths[::-1], transform, batch_size=64, num_workers=1, progress=False)
    np.testing.assert_allclose(again[::-1], feats, atol=1e-5)


def test_in_memory_images_match_files(image_folder, tiny_backbone):
    net, transform = tiny_backbone
    paths, _ = data.list_images(image_folder)
    frames = [np.asarray(data.load_image(p)) for p in paths[:3]]
    from_files = features.extract_features(net, paths[:3], transform, progress=False)
    from_frames = features.extract_features(net, frames, transform, progress=False)
    np.testing.assert_allclose(from_frames, from_files, atol=1e-5)


def test_undecodable_file_is_named(image_folder, tiny_backbone):
    net, transform = tiny_backbone
    bad = image_folder / "circles" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(features.ImageDecodeError, match="broken.jpg"):
        features.extract_features(net, [bad], transform, num_workers=0, progress=False)


def test_skip_mode_returns_which_rows_exist(image_folder, tiny_backbone, caplog):
    net, transform = tiny_backbone
    paths, _ = data.list_images(image_folder)
    bad = image_folder / "circles" / "zz_broken.jpg"
    bad.write_bytes(b"garbage")
    items = paths[:3] + [bad] + paths[3:5]
    feats, kept = features.extract_features(net, items, transform, batch_size=2, progress=False, on_error="skip")
    assert kept.tolist() == [0, 1, 2, 4, 5]
    assert feats.shape == (5, 1280)
    good = features.extract_features(net, [items[i] for i in kept], transform, progress=False)
    np.testing.assert_allclose(feats, good, atol=1e-5)
    assert "zz_broken.jpg" in caplog.text
    with pytest.raises(ValueError, match="on_error"):
        features.extract_features(net, items, transform, on_error="ignore")


def test_spatial_outputs_are_pooled(image_folder):
    import torch
    from torch import nn

    body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())  # (B, 8, H, W) maps, like a CNN body
    tf = model.create_backbone(pretrained=False, image_size=32)[1]
    paths, _ = data.list_images(image_folder)
    feats = features.extract_features(body, paths[:4], tf, progress=False)
    x = torch.stack([tf(data.load_image(p)) for p in paths[:4]])
    with torch.no_grad():
        expected = features.l2_normalize(body(x).mean(dim=(2, 3)).numpy())
    np.testing.assert_allclose(feats, expected, atol=1e-5)


def test_folded_fast_path_matches_and_follows_weight_updates(image_folder):
    import torch

    net, transform = model.create_backbone(pretrained=False, image_size=64)
    paths, _ = data.list_images(image_folder)
    fast = features.extract_features(net, paths, transform, progress=False)
    plain = features.extract_features(net, paths, transform, progress=False, fold_bn=False)
    np.testing.assert_allclose(fast, plain, atol=1e-4)
    with torch.no_grad():  # an in-place update, as an optimiser step makes
        net.conv_head.weight.mul_(-1.5)
    after = features.extract_features(net, paths, transform, progress=False)
    np.testing.assert_allclose(after, features.extract_features(net, paths, transform, progress=False, fold_bn=False),
                               atol=1e-4)
    assert not np.allclose(after, fast, atol=1e-3), "the cached folded copy must not outlive a weight change"
