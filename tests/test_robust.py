"""WiSE-FT (robust.wise_ft) and the output-space ensemble (robust.output_ensemble) on a real, tiny
fine-tuning run: the weight is chosen by the retrieval validation, and the model holds exactly the
interpolated body / embeds exactly the weighted concatenation of both networks."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from test_train import _learner, folder  # noqa: F401 - the drawn labelled folder and its tiny learner

from utils_cv.similarity import checkpoint, features, rerank, robust, train
from utils_cv.similarity.callbacks import retrieval_validation


def test_interpolate_mixes_only_the_body_floats():
    start = {"body.w": torch.zeros(3), "body.n": torch.tensor(1), "neck.w": torch.zeros(2)}
    end = {"body.w": torch.ones(3), "body.n": torch.tensor(5), "neck.w": torch.ones(2), "body.new": torch.ones(1)}
    mid = robust.interpolate(start, end, 0.25)
    torch.testing.assert_close(mid["body.w"], torch.full((3,), 0.25))
    assert mid["body.n"].item() == 5, "integer buffers (batch-norm counters) keep the trained value"
    torch.testing.assert_close(mid["neck.w"], torch.ones(2))  # the head did not exist before training
    torch.testing.assert_close(mid["body.new"], torch.ones(1))
    torch.testing.assert_close(robust.interpolate(start, end, 0.0)["body.w"], torch.zeros(3))
    with pytest.raises(ValueError, match="alpha"):
        robust.interpolate(start, end, 1.5)


def test_fine_tune_with_wise_ft_keeps_the_best_validated_mix(folder):
    learn = _learner(folder)
    res = train.fine_tune(learn, 2, lr=3e-3, freeze_epochs=0, progress=False, wise_ft=True)
    cb = retrieval_validation(learn)
    assert sorted(res.wise_scores) == list(robust.ALPHAS)
    assert res.wise_scores[res.wise_alpha] == max(res.wise_scores.values())
    # softmax: the embedding is the body's output, so alpha 0 gives back the starting features
    assert res.wise_scores[0.0] == pytest.approx(res.log[0]["map@r"], abs=1e-6)
    assert res.wise_scores[1.0] == pytest.approx(res.best_score, abs=1e-9)
    expected = robust.interpolate(cb.start_state, cb.best_state, res.wise_alpha)
    for name, value in learn.model.state_dict().items():
        torch.testing.assert_close(value, expected[name])
    assert cb.score() == pytest.approx(res.wise_scores[res.wise_alpha], abs=1e-6)


def test_a_forced_mix_holds_the_midpoint_and_bad_calls_are_refused(folder):
    learn = _learner(folder)
    with pytest.raises(ValueError, match="fine-tune first"):
        robust.wise_ft(learn)
    train.fine_tune(learn, 1, lr=3e-3, freeze_epochs=0, progress=False)
    cb = retrieval_validation(learn)
    trained = {k: v.clone() for k, v in learn.model.state_dict().items()}
    got = robust.wise_ft(learn, alphas=[0.5])
    assert got.alpha == 0.5
    name = next(k for k, v in trained.items() if k.startswith("body.") and v.is_floating_point()
                and not torch.equal(v, cb.start_state[k]))
    torch.testing.assert_close(learn.model.state_dict()[name], (cb.start_state[name] + trained[name]) / 2)
    with pytest.raises(ValueError, match="alphas"):
        robust.wise_ft(learn, alphas=[2.0])
    unvalidated = _learner(folder, validate_every_epoch=False)
    with pytest.raises(ValueError, match="validation images"):
        robust.wise_ft(unvalidated)


def test_output_ensemble_keeps_the_best_validated_weight(folder):
    learn = _learner(folder)
    res = train.fine_tune(learn, 2, lr=3e-3, freeze_epochs=0, progress=False)
    got = robust.output_ensemble(learn)
    assert sorted(got.scores) == list(robust.WEIGHTS)
    assert got.scores[got.weight] == max(got.scores.values())
    # weight 0: the fine-tuned model as trained; weight 1: the starting features (softmax: the body's output)
    assert got.scores[0.0] == pytest.approx(res.best_score, abs=1e-6)
    assert got.scores[1.0] == pytest.approx(res.log[0]["map@r"], abs=1e-6)
    net = learn.model
    assert (net.reference is None) == (got.weight == 0.0)
    assert retrieval_validation(learn).score() == pytest.approx(got.scores[got.weight], abs=1e-6)


def test_a_forced_ensemble_embeds_both_networks_and_survives_save_load_and_training(folder, tmp_path):
    learn = _learner(folder)
    with pytest.raises(ValueError, match="fine-tune first"):
        robust.output_ensemble(learn)
    train.fine_tune(learn, 1, lr=3e-3, freeze_epochs=0, progress=False)
    cb = retrieval_validation(learn)
    paths = folder[0][:6]
    trained, tf = train.embedding_model(learn)
    start = copy.deepcopy(learn.model.body)
    start.load_state_dict({k[5:]: v for k, v in cb.start_state.items() if k.startswith("body.")})
    a = features.extract_features(trained, paths, tf, progress=False)
    b = features.extract_features(start, paths, tf, progress=False)
    width = learn.model.embedding_dim

    assert robust.output_ensemble(learn, weights=[0.25]).weight == 0.25
    assert learn.model.embedding_dim == 2 * width and learn.model.config["ensemble_weight"] == 0.25
    both, _ = train.embedding_model(learn)
    got = features.extract_features(both, paths, tf, progress=False)
    np.testing.assert_allclose(got, np.hstack([np.sqrt(0.75) * a, np.sqrt(0.25) * b]), atol=1e-5)
    # squared distances mix as 0.75 * fine-tuned + 0.25 * starting
    sq = lambda f: ((f[:, None] - f[None]) ** 2).sum(-1)  # noqa: E731
    np.testing.assert_allclose(sq(got), 0.75 * sq(a) + 0.25 * sq(b), atol=1e-4)

    saved = checkpoint.save(learn, tmp_path / "m.pth")
    loaded, ltf = checkpoint.load(saved)
    assert loaded.metadata["ensemble_weight"] == 0.25 and loaded.num_features == 2 * width
    np.testing.assert_allclose(features.extract_features(loaded, paths, ltf, progress=False), got, atol=1e-5)
    with pytest.raises(ValueError, match="already embeds"):
        robust.output_ensemble(learn)

    reference = {k: v.clone() for k, v in learn.model.reference.state_dict().items()}
    train.fine_tune(learn, 1, lr=3e-3, freeze_epochs=0, progress=False)  # trains on, restores whole states
    for k, v in learn.model.reference.state_dict().items():
        torch.testing.assert_close(v, reference[k])  # the starting network stays frozen


def test_output_ensemble_refuses_bad_weights_and_unvalidated_learners(folder):
    learn = _learner(folder)
    train.fine_tune(learn, 1, lr=3e-3, freeze_epochs=0, progress=False)
    with pytest.raises(ValueError, match="weights"):
        robust.output_ensemble(learn, weights=[1.5])
    with pytest.raises(ValueError, match="weight"):
        learn.model.set_reference(copy.deepcopy(learn.model.body), 0.0)
    with pytest.raises(ValueError, match="validation images"):
        robust.output_ensemble(_learner(folder, validate_every_epoch=False))


def test_an_ensemble_at_another_size_changes_the_models_input_and_is_saved_so(folder, tmp_path):
    learn = _learner(folder)
    train.fine_tune(learn, 1, lr=3e-3, freeze_epochs=0, progress=False)
    got = robust.output_ensemble(learn, weights=[0.5], image_size=96)
    config = learn.model.config
    assert got.weight == 0.5 and config["image_size"] == 96 and config["trained_image_size"] == 64
    assert config["preprocessing"]["crop"] == [96, 96]
    paths = folder[0][:4]
    emb, tf = train.embedding_model(learn)
    assert tf is learn.model.transform and tuple(tf(Image.open(paths[0]).convert("RGB")).shape) == (3, 96, 96)
    loaded, ltf = checkpoint.load(checkpoint.save(learn, tmp_path / "m.pth"))
    assert loaded.metadata["image_size"] == 96 and loaded.metadata["trained_image_size"] == 64
    np.testing.assert_allclose(features.extract_features(loaded, paths, ltf, progress=False),
                               features.extract_features(emb, paths, tf, progress=False), atol=1e-5)


def test_choose_rerank_scores_the_validation_as_the_model_embeds_it(folder):
    learn = _learner(folder)
    train.fine_tune(learn, 1, lr=3e-3, freeze_epochs=0, progress=False)
    cb = retrieval_validation(learn)
    choice = robust.choose_rerank(learn, k1s=(2, 3), k2s=(1, 2), lambdas=(0.2, 1.0))
    assert len(choice.scores) == 8 and choice.scores[tuple(choice.params.values())] == max(choice.scores.values())
    # lambda 1 is the original ranking: the validation MAP@R of the model as it is
    assert choice.scores[(2, 1, 1.0)] == pytest.approx(cb.score(), abs=1e-9)
    feats = features.extract_features(train.embedding_model(learn)[0], cb.val_paths, learn.model.transform,
                                      progress=False)
    direct = rerank.choose_parameters(feats, cb.val_labels, k1s=(2, 3), k2s=(1, 2), lambdas=(0.2, 1.0))
    assert direct.scores == pytest.approx(choice.scores, abs=1e-9)
    with pytest.raises(ValueError, match="validation images"):
        robust.choose_rerank(_learner(folder, validate_every_epoch=False))


def test_choose_rerank_after_an_ensemble_at_another_size_embeds_at_that_size(folder):
    learn = _learner(folder)
    train.fine_tune(learn, 1, lr=3e-3, freeze_epochs=0, progress=False)
    robust.output_ensemble(learn, weights=[0.5], image_size=96)
    cb = retrieval_validation(learn)
    grid = dict(k1s=(3,), k2s=(1,), lambdas=(0.3, 1.0))
    choice = robust.choose_rerank(learn, **grid)
    emb, transform = train.embedding_model(learn)
    assert cb.transform is transform is learn.model.transform
    feats = features.extract_features(emb, cb.val_paths, transform, progress=False)
    assert choice.scores == pytest.approx(rerank.choose_parameters(feats, cb.val_labels, **grid).scores, abs=1e-9)
    assert choice.scores[(3, 1, 1.0)] == pytest.approx(cb.score(), abs=1e-9)  # the validation follows the size too
