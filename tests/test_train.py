import json

import numpy as np
import pytest
import torch

from conftest import draw_image_folder
from utils_cv.similarity import data, features, train


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


def test_training_is_deterministic_on_cpu(folder):
    states = []
    for _ in range(2):
        learn = _learner(folder, validate_every_epoch=False)
        train.fine_tune(learn, 1, freeze_epochs=0, progress=False)
        states.append({k: v.clone() for k, v in learn.model.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_retrieval_validation_never_returns_a_worse_model(folder):
    learn = _learner(folder)
    start = {k: v.clone() for k, v in learn.model.state_dict().items()}
    log = train.fine_tune(learn, 2, lr=5.0, freeze_epochs=0, progress=False)  # a learning rate that wrecks it
    scores = [e["map@r"] for e in log]
    assert log[0]["epoch"] == 0 and len(scores) == 3
    best = int(np.argmax(scores))
    kept = learn.model.state_dict()
    if best == 0:
        assert all(torch.equal(kept[k], start[k]) for k in start)
    m, tf = train.embedding_model(learn)
    paths, labels = folder
    valid_cb = train._retrieval_cb(learn)
    from utils_cv.similarity import metrics

    feats = features.extract_features(m, valid_cb.val_paths, tf, progress=False)
    final = metrics.evaluate_retrieval(feats, valid_cb.val_labels, ks=(1,))["map@r"]
    assert final == pytest.approx(max(scores), abs=1e-6)
    assert final >= scores[0] - 1e-9


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


@pytest.mark.parametrize("head", ["softmax", "normsoftmax"])
def test_save_load_round_trip_gives_identical_embeddings(folder, tmp_path, head):
    paths, _ = folder
    learn = _learner(folder, head=head, validate_every_epoch=False)
    train.fine_tune(learn, 1, freeze_epochs=0, progress=False)
    path = train.save(learn, tmp_path / "model.pth")
    meta = json.loads((tmp_path / "model.pth.json").read_text())
    assert meta["backbone"] == "efficientnet_lite0" and meta["head"] == head
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


def test_lr_find_leaves_weights_and_log_alone(folder):
    learn = _learner(folder)
    start = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with learn.no_bar():
        suggestion = learn.lr_find(num_it=8, show_plot=False)
    assert suggestion.valley > 0
    assert train._retrieval_cb(learn).history == []
    assert all(torch.equal(start[k], v) for k, v in learn.model.state_dict().items())
    log = train.fine_tune(learn, 1, freeze_epochs=0, progress=False)
    assert [e["epoch"] for e in log] == [0, 1]


def test_a_batch_larger_than_the_training_set_still_trains(folder, caplog):
    learn = _learner(folder, batch_size=64, validate_every_epoch=False)  # 18 training images
    assert "using 18" in caplog.text
    assert len(learn.dls.train) == 1
    before = [p.detach().clone() for p in learn.model.classifier.parameters()]
    train.fine_tune(learn, 0, freeze_epochs=1, progress=False)
    after = list(learn.model.classifier.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "the head was trained"


SAVE_CHILD = """
import sys
from conftest import draw_image_folder
from pathlib import Path
from utils_cv.similarity import data, train
root = draw_image_folder(Path(sys.argv[2]), per_class=4)
paths, labels = data.list_images(root)
learn = train.create_learner(paths, labels, backbone="resnet50", pretrained=False, image_size=32, valid=0.25,
                             validate_every_epoch=False)
while True:
    train.save(learn, sys.argv[1])
    print("saved", flush=True)
"""


@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_killing_a_process_mid_save_leaves_a_loadable_model(folder, tmp_path, fraction):
    """SIGKILL while a ~95 MB model file is being written: the file on disk still loads."""
    import os
    from pathlib import Path

    from conftest import kill_mid_save

    target = tmp_path / "model.pth"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    kill_mid_save(SAVE_CHILD, [str(target), str(tmp_path / "imgs")], fraction, env=env)
    module, _ = train.load(target)
    assert module.metadata["backbone"] == "resnet50"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.pth")]
    assert all(p.endswith(".tmp") for p in leftovers), leftovers  # at most the killed write's temp file
