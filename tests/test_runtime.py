"""Exported runtimes (ONNX Runtime, OpenVINO) against the eager torch path, on real images and a real
model; the device-selection and mixed-precision logic of the GPU path, checked on the CPU."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from utils_cv.similarity import data, features, heads, model, runtime


@pytest.fixture(scope="module")
def images():
    paths, _ = data.list_images(data.default_dataset())
    return paths[::40][:12]


@pytest.fixture(scope="module")
def backbone():
    return model.create_backbone()  # ImageNet weights: features worth comparing


def _eager(net, tf, paths):
    return features.FeatureExtractor(net, tf).extract(paths, progress=False).features


@pytest.mark.parametrize("name", ["onnx", "openvino"])
def test_fp32_runtimes_equal_eager_and_export_once(name, images, backbone, cache_dir):
    pytest.importorskip("onnxruntime" if name == "onnx" else "openvino")
    net, tf = backbone
    ref = _eager(net, tf, images)
    got = features.FeatureExtractor(net, tf, runtime=name).extract(images, progress=False)
    assert got.features.shape == ref.shape and got.features.dtype == np.float32
    cos = (got.features * ref).sum(1)
    assert cos.min() >= 0.9999, cos
    exported = sorted((cache_dir / "exported").glob("*.onnx"))
    assert len(exported) == 1
    stamp = exported[0].stat().st_mtime_ns
    again = features.FeatureExtractor(net, tf, runtime=name).extract(images[:3], progress=False)
    np.testing.assert_allclose(again.features, got.features[:3], atol=1e-6)
    assert exported[0].stat().st_mtime_ns == stamp, "a second extractor loads the cached export"
    # another input size is another export; the weights' change too
    small = model.create_backbone(image_size=160)[1]
    features.FeatureExtractor(net, small, runtime=name).extract(images[:2], progress=False)
    assert len(list((cache_dir / "exported").glob("*.onnx"))) == 2
    assert not list((cache_dir / "exported").glob(".*")), "no temporary file is left behind"


def test_a_model_with_its_starting_network_beside_exports_both(images, backbone, cache_dir):
    pytest.importorskip("onnxruntime")
    net, tf = backbone
    sim = heads.SimilarityNet(copy.deepcopy(net), 3, transform=tf)
    sim.set_reference(model.create_backbone(pretrained=False)[0], 0.3)  # robust.output_ensemble's layout
    emb = heads.EmbeddingModel(sim).eval()
    ref = _eager(emb, tf, images)
    assert ref.shape == (len(images), 2 * model.num_features(net))
    got = features.FeatureExtractor(emb, tf, runtime="onnx").extract(images, progress=False).features
    assert (got * ref).sum(1).min() >= 0.9999


def test_a_changed_model_is_exported_again(images, cache_dir):
    pytest.importorskip("onnxruntime")
    net, tf = model.create_backbone(pretrained=False, image_size=64)
    first = features.FeatureExtractor(net, tf, runtime="onnx").extract(images[:4], progress=False).features
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5)
    second = features.FeatureExtractor(net, tf, runtime="onnx").extract(images[:4], progress=False).features
    assert len(list((cache_dir / "exported").glob("*.onnx"))) == 2
    np.testing.assert_allclose(second, _eager(net, tf, images[:4]), atol=1e-4)
    assert not np.allclose(first, second, atol=1e-3)


def test_reduced_precisions_stay_close_to_fp32(images, backbone, cache_dir):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    net, tf = backbone
    ref = _eager(net, tf, images)
    bf16 = features.FeatureExtractor(net, tf, runtime="openvino", precision="bf16").extract(images, progress=False)
    assert (bf16.features * ref).sum(1).min() >= 0.99
    int8 = features.FeatureExtractor(net, tf, runtime="onnx", precision="int8", calibration=images[:8])
    got = int8.extract(images, progress=False).features
    cos = (got * ref).sum(1)
    assert 0.6 <= cos.mean() < 0.9999, "quantised: close to, but not equal to, the fp32 features"
    assert len(list((cache_dir / "exported").glob("*-int8-*.onnx"))) == 1
    # the nearest neighbours mostly survive quantisation
    same = [(np.argsort(-(ref @ ref[i]))[1] == np.argsort(-(got @ got[i]))[1]) for i in range(len(images))]
    assert np.mean(same) >= 0.5


def test_bad_runtime_or_precision_is_refused_with_the_choices(backbone):
    net, tf = backbone
    with pytest.raises(ValueError, match=r"'runtime'.*\['torch', 'onnx', 'openvino'\].*'tensorrt'"):
        features.FeatureExtractor(net, tf, runtime="tensorrt")
    with pytest.raises(ValueError, match=r"'precision'.*\['fp32', 'int8'\].*runtime='onnx'.*'bf16'"):
        features.FeatureExtractor(net, tf, runtime="onnx", precision="bf16")
    with pytest.raises(ValueError, match=r"'precision'.*\['fp32'\].*'int8'"):
        features.FeatureExtractor(net, tf, precision="int8")
    with pytest.raises(ValueError, match="runs on the CPU"):
        runtime.check_runtime("openvino", "fp32", torch.device("cuda"))


def test_mixed_precision_only_on_cuda():
    cpu = features.autocast(torch.device("cpu"))
    with cpu:
        assert not torch.is_autocast_enabled()
    with warnings.catch_warnings():  # without CUDA, torch says autocast is off: the choice is what is tested
        warnings.simplefilter("ignore")
        cuda = features.autocast(torch.device("cuda"))
    assert isinstance(cuda, torch.autocast) and cuda.fast_dtype == torch.float16 and cuda.device == "cuda"


@pytest.mark.gpu
def test_cuda_extraction_matches_the_cpu(images, backbone):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    net, tf = backbone
    ref = _eager(net, tf, images)
    got = features.FeatureExtractor(net, tf, device="cuda").extract(images, progress=False).features
    assert (got * ref).sum(1).min() >= 0.999


def test_decoding_threads_give_the_same_rows_order_and_skips(image_folder, backbone):
    net, tf = backbone
    paths, _ = data.list_images(image_folder)
    broken = image_folder / "circles" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    items = paths[:5] + [broken] + paths[5:]
    plain = features.FeatureExtractor(net, tf, batch_size=3, decode_threads=0).extract(items, on_error="skip",
                                                                                        progress=False)
    threaded = features.FeatureExtractor(net, tf, batch_size=3, decode_threads=2)
    got = threaded.extract(items, on_error="skip", progress=False, hashes=True)
    np.testing.assert_array_equal(got.kept, plain.kept)
    np.testing.assert_allclose(got.features, plain.features, atol=1e-6)
    assert [p for p, _ in got.skipped] == [broken] and len(got.hashes) == len(got.kept) == len(paths)
    with pytest.raises(features.ImageDecodeError, match="broken.jpg"):
        threaded.extract(items, progress=False)
    with pytest.raises(ValueError, match="'decode_threads'"):
        features.FeatureExtractor(net, tf, decode_threads=-1)


def test_a_cached_export_is_used_without_preparing_the_model_again(images, cache_dir):
    pytest.importorskip("onnxruntime")
    net, tf = model.create_backbone(pretrained=False, image_size=64)
    calls = []

    def prepare():
        calls.append(1)
        return runtime.prepared(net, torch.device("cpu"), True, False)

    batch = torch.stack([tf(data.load_image(p)) for p in images[:3]])
    first = runtime.ExportedModel(net, "onnx", prepare=prepare, tag="t")(batch)
    assert len(calls) == 1
    second = runtime.ExportedModel(net, "onnx", prepare=prepare, tag="t")(batch)
    assert len(calls) == 1, "the export of unchanged weights is found without a new inference copy"
    torch.testing.assert_close(first, second)
    runtime.ExportedModel(net, "onnx", prepare=prepare, tag="other")(batch)
    assert len(calls) == 2, "another preparation is another export"


def test_warm_up_builds_in_the_background_and_hands_over_its_error(images, cache_dir):
    pytest.importorskip("onnxruntime")
    net, tf = model.create_backbone(pretrained=False, image_size=64)
    batch = torch.stack([tf(data.load_image(p)) for p in images[:2]])
    reference = runtime.ExportedModel(net, "onnx")(batch)
    warmed = runtime.ExportedModel(net, "onnx")
    warmed.warm_up(tuple(batch.shape[1:]))
    torch.testing.assert_close(warmed(batch), reference)

    def broken():
        raise RuntimeError("cannot prepare")

    failing = runtime.ExportedModel(net, "onnx", prepare=broken, tag="broken")
    failing.warm_up(tuple(batch.shape[1:]))
    for _ in range(2):  # the first call gets the background build's error, the next one tries again
        with pytest.raises(RuntimeError, match="cannot prepare"):
            failing(batch)


def test_a_model_with_class_scores_exports_them_and_a_new_weight_exports_again(images, backbone, cache_dir):
    pytest.importorskip("onnxruntime")
    net, tf = backbone
    sim = heads.SimilarityNet(copy.deepcopy(net), 3, transform=tf)
    emb = heads.EmbeddingModel(sim).eval()
    plain = features.FeatureExtractor(emb, tf, runtime="onnx").extract(images, progress=False).features
    sim.set_score_weight(0.5)  # robust.class_scores's layout: the same weights, another embedding
    ref = _eager(emb, tf, images)
    assert ref.shape == (len(images), model.num_features(net) + 3) and model.num_features(emb) == ref.shape[1]
    for runtime in ("torch", "onnx"):  # neither the prepared eager copy nor the exported file is stale
        got = features.FeatureExtractor(emb, tf, runtime=runtime).extract(images, progress=False).features
        assert got.shape == ref.shape and (got * ref).sum(1).min() >= 0.9999, runtime
    assert plain.shape[1] == model.num_features(net)
