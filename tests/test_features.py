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
