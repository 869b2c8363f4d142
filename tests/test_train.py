import copy
import json

import numpy as np
import pytest
import torch

from conftest import draw_image_folder
from fastai.callback.core import Callback

from utils_cv.similarity import data, features, heads, metrics, train


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = draw_image_folder(tmp_path_factory.mktemp("train") / "images", per_class=8)
    return data.list_images(root)


def _learner(folder, **kw):
    paths, labels = folder
    args = dict(pretrained=False, image_size=64, batch_size=8, valid=0.25, seed=0)
    args.update(kw)
    return train.create_learner(paths, labels, **args)


def test_two_epochs_lower_the_training_loss(folder):
    learn = _learner(folder, augment=False, validate_every_epoch=False)
    with learn.no_bar():
        before = learn.validate(ds_idx=0)[0]
        log = train.fine_tune(learn, 2, lr=3e-3, freeze_epochs=0, progress=False)
        after = learn.validate(ds_idx=0)[0]
    assert after < before
    assert [e["epoch"] for e in log] == [1, 2] and all("train_loss" in e for e in log)


@pytest.mark.parametrize("loss", ["triplet", "multisimilarity", "proxyanchor", "arcface"])
def test_metric_learning_losses_train_and_lower_themselves(folder, loss):
    pytest.importorskip("pytorch_metric_learning")
    learn = _learner(folder, head="metric", loss=loss, augment=False, validate_every_epoch=False, batch_size=8,
                     pretrained=True)
    assert learn.model.m_per_class == 4 and learn.model.config["loss"] == loss
    log = train.fine_tune(learn, 3, lr=1e-3, freeze_epochs=0, progress=False).log
    first, last = log[0]["train_loss"], log[-1]["train_loss"]  # the loss as trained: mined pairs, proxies
    assert np.isfinite(last) and last < first, (loss, first, last)
    emb = features.extract_features(heads.EmbeddingModel(learn.model), folder[0][:4], learn.model.transform,
                                    progress=False)
    assert emb.shape == (4, 512)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("loss", ["proxyanchor", "arcface"])
def test_a_loss_with_parameters_starts_the_same_for_the_same_seed(folder, loss):
    # proxies / class centres are part of the run: the seed fixes them, not whatever ran before
    pytest.importorskip("pytorch_metric_learning")
    first = _learner(folder, head="metric", loss=loss, validate_every_epoch=False).loss_func
    torch.randn(1000)  # the process's own random state moves on
    again = _learner(folder, head="metric", loss=loss, validate_every_epoch=False).loss_func
    other = _learner(folder, head="metric", loss=loss, validate_every_epoch=False, seed=1).loss_func
    pa, pb, pc = (list(f.parameters()) for f in (first, again, other))
    assert pa and all(torch.equal(a, b) for a, b in zip(pa, pb))
    assert not all(torch.equal(a, c) for a, c in zip(pa, pc))


def test_m_per_class_batches_hold_groups_of_one_class():
    import random

    labels = ["a"] * 7 + ["b"] * 4 + ["c"] * 1 + ["d"] * 2
    order = train.m_per_class_order(labels, 4, random.Random(0))
    groups = [order[k : k + 4] for k in range(0, len(order), 4)]
    assert all(len(g) == 4 and len({labels[i] for i in g}) == 1 for g in groups)
    assert {labels[i] for i in order} == {"a", "b", "d"}, "a class of one image has no positive pair"
    assert set(range(7)) <= set(order) and {7, 8, 9, 10, 12, 13} <= set(order)
    assert order != train.m_per_class_order(labels, 4, random.Random(1))


def test_training_is_deterministic_on_cpu(folder):
    states = []
    for _ in range(2):
        learn = _learner(folder, validate_every_epoch=False)
        train.fine_tune(learn, 1, freeze_epochs=0, progress=False)
        states.append({k: v.clone() for k, v in learn.model.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


class _Snapshots(Callback):
    """Records the weights at the start of training and after every epoch's validation."""

    order = 70  # after RetrievalValidation has scored the epoch

    def __init__(self):
        super().__init__()
        self.states = []

    def before_fit(self):
        if not self.states:
            self.states.append(copy.deepcopy(self.learn.model.state_dict()))

    def after_epoch(self):
        self.states.append(copy.deepcopy(self.learn.model.state_dict()))


def test_retrieval_validation_keeps_the_weights_of_the_best_epoch(folder):
    learn = _learner(folder)
    snaps = _Snapshots()
    learn.add_cb(snaps)
    result = train.fine_tune(learn, 2, lr=5.0, freeze_epochs=0, progress=False)  # a learning rate that wrecks it
    scores = [e["map@r"] for e in result.log]
    assert [e["epoch"] for e in result.log] == [0, 1, 2] and len(snaps.states) == 3
    best = int(np.argmax(scores))  # the first of equal scores, as the callback keeps
    assert result.best_epoch == best and result.best_score == pytest.approx(scores[best])
    kept = learn.model.state_dict()
    assert all(torch.equal(kept[k], snaps.states[best][k]) for k in kept)
    m, tf = train.embedding_model(learn)
    cb = train.retrieval_validation(learn)
    feats = features.extract_features(m, cb.val_paths, tf, progress=False)
    final = metrics.evaluate_retrieval(feats, cb.val_labels, ks=(1,))["map@r"]
    assert final == pytest.approx(max(scores), abs=1e-6)
    assert final >= scores[0] - 1e-9


class _FitStarts(Callback):
    """Records the weights when each fit starts."""

    order = 70

    def __init__(self):
        super().__init__()
        self.starts = []

    def before_fit(self):
        if not hasattr(self.learn, "lr_finder"):
            self.starts.append(copy.deepcopy(self.learn.model.state_dict()))


def test_one_validation_over_warm_up_and_unfrozen_phases(folder):
    # the warm-up's last epoch is not its best here (a wild warm-up learning rate), so a restore at
    # the end of the warm-up would start the unfrozen phase from other weights than it ended with
    learn = _learner(folder, freeze_bn=True)
    snaps, starts = _Snapshots(), _FitStarts()
    learn.add_cbs([snaps, starts])
    result = train.fine_tune(learn, 2, lr=1e-3, freeze_epochs=2, freeze_lr=5.0, progress=False)
    scores = [e["map@r"] for e in result.log]
    assert [e["epoch"] for e in result.log] == [0, 1, 2, 3, 4]  # numbered once across both phases
    assert int(np.argmax(scores[:3])) != 2, "the test needs a warm-up whose last epoch is not its best"
    assert len(starts.starts) == 2
    ended_warm_up, started_unfrozen = snaps.states[2], starts.starts[1]
    assert all(torch.equal(ended_warm_up[k], started_unfrozen[k]) for k in ended_warm_up)
    best = int(np.argmax(scores))  # over both phases
    assert result.best_epoch == best and result.best_score == pytest.approx(scores[best])
    kept = learn.model.state_dict()
    assert all(torch.equal(kept[k], snaps.states[best][k]) for k in kept)


def test_fine_tune_returns_a_result_and_leaves_no_state_on_the_learner(folder):
    learn = _learner(folder, validate_every_epoch=False, device="cpu")
    before = set(vars(learn))
    result = train.fine_tune(learn, 1, freeze_epochs=1, progress=False)
    assert isinstance(result, train.FineTuneResult)
    assert [e["epoch"] for e in result] == [1, 2] and len(result) == 2 and result[-1] is result.log[-1]
    assert result.best_epoch is None and result.best_score is None and result.skipped == []
    assert result.seconds > 0
    import pandas as pd

    assert list(pd.DataFrame(result)["epoch"]) == [1, 2]
    for name in ("embedding_transform", "skipped", "similarity_config", "similarity_log"):
        assert not hasattr(learn, name), name
    added = set(vars(learn)) - before - {"epoch", "n_epoch", "loss", "pred", "xb", "yb", "smooth_loss", "iter",
                                         "n_iter", "final_record", "dl", "loss_grad", "lr_finder", "train_iter",
                                         "pct_train", "training"}
    assert not added, added
    assert learn.dls.device == torch.device("cpu")
    assert learn.model.config["head"] == "softmax" and learn.model.transform is not None


def test_embeddings_softmax_penultimate_and_normsoftmax_unit_norm(folder):
    paths, _ = folder
    soft = _learner(folder, validate_every_epoch=False)
    m, tf = train.embedding_model(soft)
    x = torch.stack([tf(data.load_image(p)) for p in paths[:3]])
    with torch.no_grad():
        torch.testing.assert_close(m(x), soft.model.body(x))
    norm = _learner(folder, head="normsoftmax", embedding_dim=32, validate_every_epoch=False)
    train.fine_tune(norm, 1, freeze_epochs=0, progress=False)
    m, tf = train.embedding_model(norm)
    with torch.no_grad():
        z = m(x)
    assert z.shape == (3, 32)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("head,loss", [("softmax", None), ("normsoftmax", None), ("metric", "proxyanchor")])
def test_save_load_round_trip_gives_identical_embeddings(folder, tmp_path, head, loss):
    paths, _ = folder
    if loss:
        pytest.importorskip("pytorch_metric_learning")
    learn = _learner(folder, head=head, loss=loss, validate_every_epoch=False)
    train.fine_tune(learn, 1, freeze_epochs=0, progress=False)
    path = train.save(learn, tmp_path / "model.pth")
    meta = json.loads((tmp_path / "model.pth.json").read_text())
    assert meta["backbone"] == "efficientnet_lite0" and meta["head"] == head and meta.get("loss") == loss
    assert meta["classes"] == ["circles", "squares", "stripes"] and "torch" in meta["versions"]
    m1, tf1 = train.embedding_model(learn)
    m2, tf2 = train.load(path)
    f1 = features.extract_features(m1, paths, tf1, progress=False)
    f2 = features.extract_features(m2, paths, tf2, progress=False)
    np.testing.assert_array_equal(f1, f2)
    assert not list(tmp_path.glob(".*.tmp"))


def test_tampered_or_foreign_files_are_refused(folder, tmp_path):
    learn = _learner(folder, validate_every_epoch=False)
    path = train.save(learn, tmp_path / "model.pth")
    blob = torch.load(path, weights_only=True)
    meta = json.loads(blob["metadata"])
    meta["tensors"]["neck.weight"] = [1, 2]  # metadata that no longer matches the weights
    blob["metadata"] = json.dumps(meta)
    torch.save(blob, tmp_path / "tampered.pth")
    with pytest.raises(ValueError, match="do not match its metadata"):
        train.load(tmp_path / "tampered.pth")
    blob = torch.load(path, weights_only=True)
    blob["state_dict"]["classifier.1.weight"] = torch.zeros(7, 1280)
    meta = json.loads(blob["metadata"])
    meta["tensors"]["classifier.1.weight"] = [7, 1280]
    blob["metadata"] = json.dumps(meta)
    torch.save(blob, tmp_path / "mismatch.pth")
    with pytest.raises(ValueError, match="do not fit"):
        train.load(tmp_path / "mismatch.pth")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="not written by"):
        train.load(tmp_path / "foreign.pth")
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a torch file")
    with pytest.raises(ValueError, match="not a readable model file"):
        train.load(tmp_path / "garbage.pth")
    with pytest.raises(FileNotFoundError):
        train.load(tmp_path / "missing.pth")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_not_executed(tmp_path):
    import pickle

    from conftest import PickleExploit

    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"format": train.FORMAT, "metadata": "{}", "state_dict": PickleExploit(marker)}, f)
    with pytest.raises(ValueError, match="not a readable model file"):
        train.load(tmp_path / "evil.pth")
    assert not marker.exists()


def test_bad_arguments(folder):
    paths, labels = folder
    with pytest.raises(ValueError, match="'head'"):
        train.create_learner(paths, labels, head="arcface", pretrained=False)
    with pytest.raises(ValueError, match="aligned"):
        train.create_learner(paths[:3], labels, pretrained=False)
    with pytest.raises(ValueError, match="'valid'"):
        train.create_learner(paths, labels, valid="half", pretrained=False)


def test_mixed_precision_is_chosen_for_cuda_only(folder):
    import fastai.vision.all as fv

    learn = _learner(folder, device="cpu")
    assert not any(isinstance(cb, fv.MixedPrecision) for cb in learn.cbs), "float32 on the CPU"
    assert not learn.dls.train.pin_memory
    with pytest.raises(ValueError, match="'mixed_precision'.*CUDA.*cpu"):
        _learner(folder, device="cpu", mixed_precision=True)
    assert not any(isinstance(cb, fv.MixedPrecision) for cb in _learner(folder, mixed_precision=False).cbs)


@pytest.mark.gpu
def test_cuda_training_runs_in_mixed_precision(folder):
    import fastai.vision.all as fv

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    learn = _learner(folder, device="cuda")
    assert any(isinstance(cb, fv.MixedPrecision) for cb in learn.cbs) and learn.dls.train.pin_memory
    result = train.fine_tune(learn, 1, freeze_epochs=0, progress=False)
    assert len(result.log) == 2 and np.isfinite(result.log[-1]["map@r"])


def test_lr_find_leaves_weights_and_log_alone_and_writes_nothing_here(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    learn = _learner(folder)
    start = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with learn.no_bar():
        suggestion = learn.lr_find(num_it=8, show_plot=False)
    assert suggestion.valley > 0
    assert train.retrieval_validation(learn).history == []
    assert all(torch.equal(start[k], v) for k, v in learn.model.state_dict().items())
    log = train.fine_tune(learn, 1, freeze_epochs=0, progress=False)
    assert [e["epoch"] for e in log] == [0, 1]
    assert list(tmp_path.iterdir()) == [], "lr_find wrote into the working directory"


def test_a_batch_larger_than_the_training_set_still_trains(folder, caplog):
    learn = _learner(folder, batch_size=64, validate_every_epoch=False)  # 18 training images
    assert "using 18" in caplog.text
    assert len(learn.dls.train) == 1
    before = [p.detach().clone() for p in learn.model.classifier.parameters()]
    train.fine_tune(learn, 0, freeze_epochs=1, progress=False)
    after = list(learn.model.classifier.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "the head was trained"


class _BatchNormStats(Callback):
    """Records the first batch norm's running mean at the start and end of each training phase."""

    order = 99

    def __init__(self):
        self.means = []

    def before_train(self):
        self._start = self._bn().running_mean.clone()

    def after_train(self):
        self.means.append((self._start, self._bn().running_mean.clone()))

    def _bn(self):
        return next(m for m in self.learn.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


def test_frozen_batch_norm_statistics_never_move(folder):
    learn = _learner(folder, pretrained=True, freeze_bn=True)
    stats = _BatchNormStats()
    learn.add_cb(stats)
    train.fine_tune(learn, 1, freeze_epochs=1, progress=False)
    assert len(stats.means) == 2 and all(torch.equal(s, e) for s, e in stats.means)
    moving = _learner(folder, pretrained=True, freeze_bn=False)  # the same run with them free: they move
    stats = _BatchNormStats()
    moving.add_cb(stats)
    train.fine_tune(moving, 1, freeze_epochs=0, progress=False)
    assert not torch.equal(*stats.means[0])


class _Boom(Callback):
    """Raises after the first epoch of the second fit, as an interrupted run would."""

    order = 80

    def __init__(self):
        super().__init__()
        self.fits = 0

    def before_fit(self):
        self.fits += 1

    def after_epoch(self):
        if self.fits == 2:
            raise RuntimeError("interrupted")


def test_an_interrupted_run_leaves_the_weights_it_stopped_with(folder):
    learn = _learner(folder)
    learn.add_cb(_Boom())
    with pytest.raises(RuntimeError, match="interrupted"):
        train.fine_tune(learn, 2, freeze_epochs=1, progress=False)
    stopped = copy.deepcopy(learn.model.state_dict())
    with learn.no_bar():
        learn.validate()  # fires after_fit: must not restore the best epoch of the interrupted run
    assert all(torch.equal(stopped[k], v) for k, v in learn.model.state_dict().items())


def test_validation_on_held_out_classes_never_hands_back_worse_features_for_them(tmp_path):
    # the safety net: classes the model never trains on drive the validation; even a
    # learning rate that wrecks the network hands back features at least as good on them as
    # the ImageNet features it started from (the softmax embedding at epoch 0 is the body's output)
    root = draw_image_folder(tmp_path / "images", classes=("a_circles", "b_squares", "c_stripes", "d_circles2",
                                                           "e_stripes2"), per_class=5, seed=2)
    paths, labels = data.list_images(root)
    held = {"d_circles2", "e_stripes2"}
    train_p = [p for p, l in zip(paths, labels) if l not in held]
    train_l = [l for l in labels if l not in held]
    val = ([p for p, l in zip(paths, labels) if l in held], [l for l in labels if l in held])
    learn = train.create_learner(train_p, train_l, image_size=128, batch_size=8, valid=val, seed=0)  # ImageNet start
    start, _ = train.embedding_model(learn)
    result = train.fine_tune(learn, 2, lr=5.0, freeze_epochs=0, progress=False)
    m, tf = train.embedding_model(learn)
    score = lambda net: metrics.evaluate_retrieval(  # noqa: E731
        features.extract_features(net, val[0], tf, progress=False), val[1], ks=(1,))["map@r"]
    assert result.log[0]["map@r"] == pytest.approx(score(start), abs=1e-6)
    assert score(m) >= score(start) - 1e-9
    assert score(start) < 1.0, "a validation that can still be improved on"
