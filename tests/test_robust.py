"""WiSE-FT (robust.wise_ft) on a real, tiny fine-tuning run: the mixing weight is chosen by the
retrieval validation and the model holds exactly the interpolated body."""
import pytest
import torch

from test_train import _learner, folder  # noqa: F401 - the drawn labelled folder and its tiny learner

from utils_cv.similarity import robust, train
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
