import numpy as np
import pytest
import torch
from PIL import Image

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


def _state(net):
    return {k: (v.clone(), v.stride(), v.device, v.requires_grad) for k, v in net.named_parameters()}


@pytest.mark.parametrize("training", [False, True])
def test_the_callers_model_is_left_exactly_as_it_was(image_folder, training):
    net, transform = model.create_backbone(pretrained=False, image_size=64)
    net.train(training)
    before, attrs = _state(net), dict(net.__dict__)
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    modes = {name: m.training for name, m in net.named_modules()}
    paths, _ = data.list_images(image_folder)
    features.extract_features(net, paths[:4], transform, progress=False, device="cpu")
    features.FeatureExtractor(net, transform).extract(paths[:4], progress=False)
    after = _state(net)
    assert before.keys() == after.keys()
    for k, (value, stride, dev, grad) in before.items():
        assert torch.equal(value, after[k][0]) and stride == after[k][1] and dev == after[k][2] and grad == after[k][3], k
    assert net.conv_stem.weight.is_contiguous(), "not switched to channels_last"
    assert dict(net.__dict__) == attrs and set(net.__dict__) == set(attrs)
    assert all(torch.equal(v, buffers[k]) for k, v in net.named_buffers())
    assert {name: m.training for name, m in net.named_modules()} == modes


def test_extractor_is_a_snapshot_and_matches_the_one_call_form(image_folder, tiny_backbone):
    net, transform = model.create_backbone(pretrained=False, image_size=64)
    paths, _ = data.list_images(image_folder)
    extractor = features.FeatureExtractor(net, transform, batch_size=5)
    first = extractor.extract(paths, progress=False)
    assert first.kept.tolist() == list(range(12)) and first.skipped == [] and first.kept.dtype == np.int64
    np.testing.assert_allclose(first.features, features.extract_features(net, paths, transform, progress=False),
                               atol=1e-6)
    with torch.no_grad():
        net.conv_head.weight.mul_(-1.5)
    np.testing.assert_array_equal(extractor.extract(paths, progress=False).features, first.features)
    assert not np.allclose(features.FeatureExtractor(net, transform).extract(paths, progress=False).features,
                           first.features, atol=1e-3), "a new extractor sees the new weights"


def test_prepared_copies_are_shared_while_unchanged_and_freed_with_the_model():
    import gc
    import weakref

    net, transform = model.create_backbone(pretrained=False, image_size=64)
    a, b = features.FeatureExtractor(net, transform), features.FeatureExtractor(net, transform, batch_size=3)
    assert a._model is b._model, "repeated extract_features calls prepare the model once"
    assert features.FeatureExtractor(net, transform, fold_bn=False)._model is not a._model
    copy_ref = weakref.ref(a._model)
    del a, b, net
    gc.collect()
    assert copy_ref() is None, "the side table does not keep a copy of a model that is gone"


def test_undecodable_file_is_named(image_folder, tiny_backbone):
    net, transform = tiny_backbone
    bad = image_folder / "circles" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(features.ImageDecodeError, match="broken.jpg.*on_error='skip'"):
        features.extract_features(net, [bad], transform, num_workers=0, progress=False)


def test_skip_mode_returns_which_rows_exist(image_folder, tiny_backbone, caplog):
    net, transform = tiny_backbone
    paths, _ = data.list_images(image_folder)
    bad = image_folder / "circles" / "zz_broken.jpg"
    bad.write_bytes(b"garbage")
    items = paths[:3] + [bad] + paths[3:5]
    result = features.FeatureExtractor(net, transform, batch_size=2).extract(items, on_error="skip", progress=False)
    assert result.kept.tolist() == [0, 1, 2, 4, 5]
    assert result.features.shape == (5, 1280)
    assert [item for item, _ in result.skipped] == [bad] and "zz_broken.jpg" in result.skipped[0][1]
    good = features.extract_features(net, [items[i] for i in result.kept], transform, progress=False)
    np.testing.assert_allclose(result.features, good, atol=1e-5)
    assert "zz_broken.jpg" in caplog.text
    with pytest.raises(ValueError, match=r"FeatureExtractor.*extract\(.*on_error='skip'\)"):
        features.extract_features(net, items, transform, on_error="skip")
    with pytest.raises(ValueError, match="on_error"):
        features.FeatureExtractor(net, transform).extract(items, on_error="ignore")
    nothing = features.FeatureExtractor(net, transform).extract([bad], on_error="skip", progress=False)
    assert nothing.features.shape == (0, 1280) and nothing.kept.shape == (0,) and len(nothing.skipped) == 1


def test_spatial_outputs_are_pooled(image_folder):
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
    assert not np.allclose(after, fast, atol=1e-3), "a weight change is seen by the next call"


# ---------------------------------------------------------------------------- in-memory images
def _photo(w: int = 48, h: int = 32) -> np.ndarray:
    """A non-square, asymmetric picture: a rotation or a lost alpha changes its pixels."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, (x * y) % 256], axis=-1).astype(np.uint8)
    rgb[: h // 3, : w // 4] = (200, 30, 30)
    return rgb


def _cos_all(rows: np.ndarray) -> float:
    return float((rows @ rows[0]).min())


def test_same_pixels_same_features_whatever_the_container(tmp_path, tiny_backbone):
    net, transform = tiny_backbone
    rgb = _photo()
    Image.fromarray(rgb).save(tmp_path / "p.png")
    items = [tmp_path / "p.png", Image.fromarray(rgb), rgb, rgb.astype(np.float32) / 255.0,
             rgb.astype(np.float64) / 255.0, np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])]
    for item in items:
        assert np.array_equal(np.asarray(features.to_rgb_image(item)), rgb)
    feats = features.extract_features(net, items, transform, progress=False)
    assert _cos_all(feats) >= 0.9999
    np.testing.assert_allclose(feats, np.broadcast_to(feats[0], feats.shape), atol=1e-6)


def test_transparency_is_composited_on_white_for_every_container(tmp_path, tiny_backbone):
    net, transform = tiny_backbone
    rgba = np.dstack([_photo(), np.zeros((32, 48), np.uint8)])
    rgba[8:24, 12:36, 3] = 255  # opaque in the middle, transparent around
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:
        im.load()
    items = [tmp_path / "a.png", im, Image.fromarray(rgba, "RGBA"), rgba, rgba.astype(np.float32) / 255.0]
    expected = np.asarray(data.load_image(tmp_path / "a.png"))
    assert (expected[0, 0] == 255).all() and (expected[16, 20] == rgba[16, 20, :3]).all()
    for item in items:
        assert np.array_equal(np.asarray(features.to_rgb_image(item)), expected)
    feats = features.extract_features(net, items, transform, progress=False)
    assert _cos_all(feats) >= 0.9999
    gray_alpha = np.dstack([rgba[..., 0], rgba[..., 3]])
    assert (np.asarray(features.to_rgb_image(gray_alpha))[0, 0] == 255).all()


def test_exif_orientation_is_applied_to_pil_images_as_to_files(tmp_path, tiny_backbone):
    net, transform = tiny_backbone
    im = Image.fromarray(_photo())
    exif = im.getexif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "r.jpg") as opened:
        assert opened.size == (48, 32)
        as_pil = features.to_rgb_image(opened)
        feats = features.extract_features(net, [tmp_path / "r.jpg", opened], transform, progress=False)
        assert opened.size == (48, 32), "the caller's image is not changed"
    assert as_pil.size == (32, 48)
    assert np.array_equal(np.asarray(as_pil), np.asarray(data.load_image(tmp_path / "r.jpg")))
    assert _cos_all(feats) >= 0.9999


@pytest.mark.parametrize("array,match", [
    (np.full((8, 8, 3), 2.0, np.float32), r"\[0, 1\].*astype\(np.uint8\)"),
    (np.full((8, 8, 3), -0.5), r"\[0, 1\]"),
    (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
    (np.full((8, 8, 3), 300, np.int32), r"\[0, 255\]"),
    (np.zeros((3, 8, 8), np.uint8), "transpose"),
    (np.zeros((8, 8, 3), bool), "dtype bool"),
])
def test_arrays_that_cannot_be_read_safely_are_refused(array, match):
    with pytest.raises(ValueError, match=match):
        features.to_rgb_image(array)


def _photo_like(path, size=(2400, 1800), seed=0):
    """A big JPEG with smooth structure and texture, like a photo (not flat colour)."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 90 * np.sin(xx / (97 + 13 * c) + yy / (151 - 17 * c) + c) for c in range(3)], -1)
    img += rng.normal(0, 12, size=(h, w, 3))
    from PIL import ImageDraw
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    r = max(8, min(w, h) // 6)
    for _ in range(12):
        x, y = rng.integers(0, w - r), rng.integers(0, h - r)
        d.ellipse([x, y, x + rng.integers(r // 4, r), y + rng.integers(r // 4, r)],
                  fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    im.save(path, quality=90)
    return path


def test_big_photos_decode_at_reduced_scale_with_the_same_features(tmp_path):
    from utils_cv.similarity import data, model
    from utils_cv.similarity.features import FeatureExtractor

    paths = [_photo_like(tmp_path / f"big_{i}.jpg", seed=i) for i in range(3)]
    small = data.load_image(paths[0], min_size=256)
    assert min(small.size) >= 256 and max(small.size) < 2400 / 2, small.size
    assert data.load_image(paths[0]).size == (2400, 1800)
    net, transform = model.create_backbone()
    fast = FeatureExtractor(net, transform).extract(paths).features
    full = FeatureExtractor(net, transform, fast_decode=False).extract(paths).features
    cos = (fast * full).sum(1)
    assert cos.min() >= 0.98 and cos.mean() >= 0.99, cos
    # images smaller than twice the resize are decoded exactly as before
    ordinary = _photo_like(tmp_path / "ordinary.jpg", size=(400, 300))
    a = FeatureExtractor(net, transform).extract([ordinary]).features
    b = FeatureExtractor(net, transform, fast_decode=False).extract([ordinary]).features
    assert np.array_equal(a, b)
