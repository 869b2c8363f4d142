import numpy as np
import pytest

from conftest import draw_image_folder
from utils_cv.similarity import data, experiment, robust


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    paths, labels = data.list_images(draw_image_folder(tmp_path_factory.mktemp("exp") / "images", per_class=8))
    tr, te = data.split_by_image(paths, labels, test_size=0.5, seed=0)
    return [paths[i] for i in tr], [labels[i] for i in tr], [paths[i] for i in te], [labels[i] for i in te]


TINY = dict(image_size=48, epochs=1, freeze_epochs=0, batch_size=8)


def test_run_trains_and_evaluates_one_recipe_with_reranking(split):
    r = experiment.run(*split, head="softmax", rerank={"k1": 3, "k2": 2}, lr=None, **TINY)  # None: the recipe lr
    assert r["model"] == "softmax" and r["image_size"] == 48 and r["epochs"] == 1 and r["lr"] == 2e-3
    for k in experiment.METRIC_KEYS:
        assert 0 <= r[k] <= 1 and 0 <= r[f"rerank {k}"] <= 1
    assert r["num_queries"] == 12 and r["train_seconds"] > 0 and r["seconds"] >= r["train_seconds"]
    # 12 training images: the 20 % validation share holds < 2 images per class, so no MAP@R
    assert [e["epoch"] for e in r["log"]] == [1] and "map@r" not in r["log"][0] and r["best_epoch"] is None
    # the row has to mean something: the fine-tuned ImageNet model beats the same network
    # with random weights (no training) on the test images
    rand = experiment.run(*split, head="softmax", name="random weights", pretrained=False,
                          **{**TINY, "epochs": 0})
    assert rand["model"] == "random weights" and rand["pretrained"] is False
    assert r["map@r"] > rand["map@r"] + 0.1 and r["recall@1"] >= rand["recall@1"]


def test_sweep_varies_one_factor_at_a_time(split):
    rows = experiment.sweep(*split, grid={"image_size": [48, 32], "head": ["softmax", "normsoftmax"]}, base=TINY)
    assert [r["model"] for r in rows] == ["base", "image_size=32", "head=normsoftmax"]
    assert [r["varied"] for r in rows] == ["base", "image_size", "head"]
    assert rows[1]["image_size"] == 32 and rows[1]["head"] == "softmax"
    assert rows[2]["head"] == "normsoftmax" and rows[2]["image_size"] == 48 and rows[2]["embedding_dim"] == 512
    frame = experiment.table(rows, extra=["train_seconds"])
    assert list(frame.index) == ["base", "image_size=32", "head=normsoftmax"]
    assert list(frame.columns) == list(experiment.METRIC_KEYS) + ["train_seconds"]
    assert np.isfinite(frame.values.astype(float)).all()


def test_baseline_and_bad_recipes(split):
    base = experiment.imagenet_baseline(split[2], split[3])
    assert base["model"] == "ImageNet efficientnet_lite0" and 0 <= base["map@r"] <= 1
    with pytest.raises(ValueError, match="Unknown recipe"):
        experiment.run(*split, lr_schedule="cosine")
    with pytest.raises(ValueError, match="embedding_dim"):
        experiment.run(*split, embedding_dim=64)
    with pytest.raises(ValueError, match="'head'"):
        experiment.run(*split, head="arcface")
    with pytest.raises(ValueError, match="'grid'"):
        experiment.sweep(*split, grid={})


def test_diffusion_rows_equal_diffusion_computed_apart(split):
    from utils_cv.similarity import diffusion, features, metrics, model

    base = experiment.imagenet_baseline(split[2], split[3], diffusion={"k": 3})
    net, transform = model.create_backbone()
    feats = features.extract_features(net, split[2], transform, progress=False)
    want = metrics.evaluate_distances(diffusion.diffusion_distances(feats, k=3), split[3])
    for k in experiment.METRIC_KEYS:
        assert base[f"diffusion {k}"] == pytest.approx(want[k]) and base[k] == pytest.approx(
            metrics.evaluate_retrieval(feats, split[3])[k])
    frame = experiment.table([base])
    assert list(frame.columns) == list(experiment.METRIC_KEYS) + [f"diffusion {k}" for k in experiment.METRIC_KEYS]


def test_run_with_a_metric_learning_loss_and_wise_ft(split):
    # the test half validates (held-out paths), so that WiSE-FT has a MAP@R to choose by
    r = experiment.run(*split, head="metric", loss="proxyanchor", valid=(split[2], split[3]), wise_ft=True, **TINY)
    assert r["model"] == "metric proxyanchor" and r["loss"] == "proxyanchor" and r["embedding_dim"] == 512
    assert r["lr_mult"] == 10, "the metric head's recipe is NormSoftmax's"
    assert r["wise_alpha"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert 0 <= r["map@r"] <= 1 and r["log"][0]["epoch"] == 0


def test_run_with_the_starting_network_and_reranking_chosen_by_the_validation(split):
    r = experiment.run(*split, head="softmax", valid=(split[2], split[3]), ensemble=64, rerank="validation", **TINY)
    assert 0.0 <= r["ensemble_weight"] <= 1.0
    params = r["rerank_params"]
    assert set(params) == {"k1", "k2", "lambda_value"} and params["k1"] in (10, 11)  # 12 images: 20, 30, 50 -> 11
    # the held-out validation is the test half here: the chosen parameters are the best there
    plain = experiment.run(*split, head="softmax", valid=(split[2], split[3]), ensemble=64, rerank=params, **TINY)
    assert plain["rerank map@r"] == pytest.approx(r["rerank map@r"], abs=1e-9)
    assert r["rerank map@r"] >= r["map@r"] - 1e-9, "lambda 1 (no re-ranking) is among the choices"
    with pytest.raises(ValueError, match="'rerank'"):
        experiment.run(*split, rerank="best", **TINY)


def test_run_with_class_scores_chosen_by_the_validation(split):
    # the held-out validation is the test half: the chosen weight is the best there, weight 0 included
    r = experiment.run(*split, head="softmax", valid=(split[2], split[3]), class_scores=True, **TINY)
    plain = experiment.run(*split, head="softmax", valid=(split[2], split[3]), **TINY)
    assert r["score_weight"] in robust.WEIGHTS and "score_weight" not in plain
    assert r["map@r"] >= plain["map@r"] - 1e-6
    with pytest.raises(ValueError, match="'class_scores'"):
        experiment.run(*split, class_scores="yes", **TINY)
    with pytest.raises(ValueError, match="gives no class logits"):  # before training
        experiment.run(*split, head="metric", loss="triplet", valid=(split[2], split[3]), class_scores=True, **TINY)
    with pytest.raises(ValueError, match="retrieval validation"):  # 20 % of 12 images: too few to validate
        experiment.run(*split, class_scores=True, **TINY)
