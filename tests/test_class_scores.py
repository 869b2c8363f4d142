"""Class scores in the embedding (robust.class_scores, SimilarityNet.set_score_weight) on a real,
tiny fine-tuning run: the weight is chosen by the retrieval validation, the model embeds exactly the
weighted concatenation of its normalised features and its normalised, centred class logits, and
keeps doing so after save / load and beside the starting network."""
import numpy as np
import pytest
import torch
from torch import nn

from test_train import _learner, folder  # noqa: F401 - the drawn labelled folder and its tiny learner

from utils_cv.similarity import checkpoint, features, metrics, robust, train
from utils_cv.similarity.callbacks import retrieval_validation
from utils_cv.similarity.features import ImageDecodeError


class _Logits(nn.Module):
    """The class logits of a SimilarityNet, computed apart from its embed()."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.classifier(self.net.neck(self.net.body(x)))


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _parts(learn, paths):
    """The model's plain features and its centred, normalised class logits, extracted separately."""
    emb, tf = train.embedding_model(learn)
    plain = features.extract_features(emb, paths, tf, progress=False)
    logits = features.extract_features(_Logits(learn.model).eval(), paths, tf, progress=False)
    return plain, _unit(logits - logits.mean(1, keepdims=True))


def test_class_scores_keeps_the_best_validated_weight(folder):
    learn = _learner(folder)
    res = train.fine_tune(learn, 2, lr=3e-3, freeze_epochs=0, progress=False)
    cb = retrieval_validation(learn)
    plain, scores = _parts(learn, cb.val_paths)
    got = robust.class_scores(learn)
    assert sorted(got.scores) == list(robust.WEIGHTS)
    assert got.scores[got.weight] == max(got.scores.values())
    assert min(w for w, s in got.scores.items() if s == got.scores[got.weight]) == got.weight  # ties: smaller
    # weight 0: the model as trained; weight 1: its class scores alone, computed here apart
    assert got.scores[0.0] == pytest.approx(res.best_score, abs=1e-6)
    assert got.scores[1.0] == pytest.approx(metrics.evaluate_retrieval(scores, cb.val_labels)["map@r"], abs=1e-6)
    assert learn.model.score_weight == got.weight
    assert cb.score() == pytest.approx(got.scores[got.weight], abs=1e-6)


def test_a_forced_weight_embeds_features_and_class_scores_and_survives_save_load(folder, tmp_path):
    learn = _learner(folder)
    train.fine_tune(learn, 1, lr=3e-3, freeze_epochs=0, progress=False)
    paths = folder[0][:6]
    plain, scores = _parts(learn, paths)
    width, n_classes = learn.model.embedding_dim, len(set(folder[1]))

    assert robust.class_scores(learn, weights=[0.25]).weight == 0.25
    assert learn.model.embedding_dim == width + n_classes and learn.model.config["score_weight"] == 0.25
    emb, tf = train.embedding_model(learn)
    got = features.extract_features(emb, paths, tf, progress=False)
    np.testing.assert_allclose(got, np.hstack([np.sqrt(0.75) * _unit(plain), np.sqrt(0.25) * scores]), atol=1e-5)
    # squared distances mix as 0.75 * features + 0.25 * class scores
    sq = lambda f: ((f[:, None] - f[None]) ** 2).sum(-1)  # noqa: E731
    np.testing.assert_allclose(sq(got), 0.75 * sq(_unit(plain)) + 0.25 * sq(scores), atol=1e-4)

    loaded, ltf = checkpoint.load(checkpoint.save(learn, tmp_path / "m.pth"))
    assert loaded.metadata["score_weight"] == 0.25 and loaded.num_features == width + n_classes
    np.testing.assert_allclose(features.extract_features(loaded, paths, ltf, progress=False), got, atol=1e-5)

    learn.model.set_score_weight(1.0)  # the class scores alone: one column per class
    assert learn.model.embedding_dim == n_classes
    alone = features.extract_features(train.embedding_model(learn)[0], paths, tf, progress=False)
    np.testing.assert_allclose(alone, scores, atol=1e-5)
    learn.model.set_score_weight(0.0)
    np.testing.assert_allclose(features.extract_features(train.embedding_model(learn)[0], paths, tf, progress=False),
                               plain, atol=1e-5)


def test_class_scores_compose_with_the_starting_network_in_that_order(folder, tmp_path):
    learn = _learner(folder)
    train.fine_tune(learn, 1, lr=3e-3, freeze_epochs=0, progress=False)
    paths = folder[0][:6]
    robust.class_scores(learn, weights=[0.5])
    mixed, tf = train.embedding_model(learn)
    trained = features.extract_features(mixed, paths, tf, progress=False)
    robust.output_ensemble(learn, weights=[0.25])
    both = features.extract_features(train.embedding_model(learn)[0], paths, tf, progress=False)
    np.testing.assert_allclose(both[:, : trained.shape[1]], np.sqrt(0.75) * trained, atol=1e-5)
    loaded, ltf = checkpoint.load(checkpoint.save(learn, tmp_path / "m.pth"))
    assert loaded.metadata["score_weight"] == 0.5 and loaded.metadata["ensemble_weight"] == 0.25
    np.testing.assert_allclose(features.extract_features(loaded, paths, ltf, progress=False), both, atol=1e-5)
    with pytest.raises(ValueError, match="before the starting network"):
        robust.class_scores(learn)


def test_class_scores_refuse_heads_without_logits_bad_weights_and_unvalidated_learners(folder, tmp_path):
    learn = _learner(folder)
    with pytest.raises(ValueError, match="fine-tune first"):
        robust.class_scores(learn)
    train.fine_tune(learn, 1, lr=3e-3, freeze_epochs=0, progress=False)
    with pytest.raises(ValueError, match="weights"):
        robust.class_scores(learn, weights=[-0.1, 0.5])
    with pytest.raises(ValueError, match="weight"):
        learn.model.set_score_weight(float("nan"))
    with pytest.raises(ValueError, match="validation images"):
        robust.class_scores(_learner(folder, validate_every_epoch=False))
    metric = _learner(folder, head="metric", loss="triplet")
    train.fine_tune(metric, 1, lr=3e-3, freeze_epochs=0, progress=False)
    with pytest.raises(ValueError, match="no class logits"):
        robust.class_scores(metric)
    # a file that claims a weight outside [0, 1] is refused with its name
    saved = checkpoint.save(learn, tmp_path / "m.pth")
    blob = torch.load(saved, weights_only=False)
    blob["metadata"] = blob["metadata"].replace('"image_size"', '"score_weight": 2, "image_size"', 1)
    torch.save(blob, saved)
    with pytest.raises(ValueError, match="m.pth.*score_weight"):
        checkpoint.load(saved)


def test_normsoftmax_class_scores_and_a_metric_loss_on_softmax_logits(folder):
    learn = _learner(folder, head="normsoftmax")
    train.fine_tune(learn, 1, lr=3e-3, freeze_epochs=0, progress=False)
    paths = folder[0][:6]
    plain, scores = _parts(learn, paths)  # NormSoftmax: cosine logits / temperature
    robust.class_scores(learn, weights=[0.5])
    got = features.extract_features(train.embedding_model(learn)[0], paths, learn.model.transform, progress=False)
    np.testing.assert_allclose(got, np.hstack([np.sqrt(0.5) * _unit(plain), np.sqrt(0.5) * scores]), atol=1e-5)
    # a triplet loss on the softmax head's outputs makes them an embedding, not class scores
    triplet = _learner(folder, loss="triplet")
    with pytest.raises(ValueError, match="'triplet' gives no class logits"):
        robust.check_class_scores(triplet)


def test_a_failed_choice_gives_back_the_weight_held_before(folder, tmp_path):
    import shutil
    from pathlib import Path

    paths, labels = folder
    own = []
    for i, (p, label) in enumerate(zip(paths, labels)):  # a copy: one of its validation images goes missing
        (tmp_path / label).mkdir(exist_ok=True)
        own.append(Path(shutil.copy(p, tmp_path / label / f"{i}{Path(p).suffix}")))
    learn = _learner((own, labels))
    train.fine_tune(learn, 1, lr=3e-3, freeze_epochs=0, progress=False)
    robust.class_scores(learn, weights=[0.3])
    Path(retrieval_validation(learn).val_paths[0]).unlink()
    with pytest.raises(ImageDecodeError, match="No such file"):
        robust.class_scores(learn)
    assert learn.model.score_weight == 0.3 and learn.model.config["score_weight"] == 0.3
