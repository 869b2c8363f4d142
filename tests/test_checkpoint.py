"""checkpoint.save / load: one self-describing weights file, atomic writes, precise errors."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import draw_image_folder
from utils_cv.similarity import checkpoint, data, features, train

TESTS = str(Path(__file__).parent)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(learner, path of its saved model) for a random-weights 32-px learner (no training)."""
    root = draw_image_folder(tmp_path_factory.mktemp("ckpt") / "images", per_class=4)
    paths, labels = data.list_images(root)
    learn = train.create_learner(paths, labels, pretrained=False, image_size=32, batch_size=4, valid=0.25,
                                 validate_every_epoch=False)
    path = checkpoint.save(learn, tmp_path_factory.mktemp("model") / "model.pth")
    return learn, path, paths


class _Deadline:
    """Fail instead of hanging: a load that opened a FIFO would block forever."""

    def __enter__(self):
        def fail(*_):
            raise TimeoutError("the call blocked")

        self.previous = signal.signal(signal.SIGALRM, fail)
        signal.alarm(10)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


def test_metadata_lives_inside_the_weights_file_and_the_json_is_a_copy(saved):
    learn, path, paths = saved
    blob = torch.load(path, weights_only=True)
    inside = json.loads(blob["metadata"])
    assert json.loads(path.with_name("model.pth.json").read_text()) == inside
    assert inside["format"] == checkpoint.FORMAT and inside["classes"] == ["circles", "squares", "stripes"]
    path.with_name("model.pth.json").unlink()  # the copy is not needed to load
    module, transform = checkpoint.load(path)
    assert module.metadata == inside and module.num_features == learn.model.embedding_dim
    m, tf = train.embedding_model(learn)
    np.testing.assert_array_equal(features.extract_features(m, paths[:4], tf, progress=False),
                                  features.extract_features(module, paths[:4], transform, progress=False))
    again = checkpoint.save(module, path.with_name("again.pth"))  # a loaded model saves again
    assert json.loads(torch.load(again, weights_only=True)["metadata"])["classes"] == inside["classes"]


@pytest.mark.parametrize("case, match", [
    ("metadata_list", "metadata is a JSON list, not an object"),
    ("metadata_null", "metadata is a JSON null, not an object"),
    ("state_list", "state_dict is a list"),
    ("classes_text", "'classes' must be a non-empty list"),
    ("size_text", "'image_size' must be an integer"),
    ("unknown_head", "head 'arcface' is not registered"),
    ("ensemble_weight", "'ensemble_weight' must be a number in \\[0, 1\\]"),
])
def test_malformed_files_raise_value_errors_naming_the_file(saved, tmp_path, case, match):
    _, path, _ = saved
    blob = torch.load(path, weights_only=True)
    meta = json.loads(blob["metadata"])
    if case == "metadata_list":
        blob["metadata"] = json.dumps([meta])
    elif case == "metadata_null":
        blob["metadata"] = "null"
    elif case == "state_list":
        blob["state_dict"] = list(blob["state_dict"].values())
    elif case == "classes_text":
        blob["metadata"] = json.dumps({**meta, "classes": "abc"})
    elif case == "size_text":
        blob["metadata"] = json.dumps({**meta, "image_size": "32"})
    elif case == "ensemble_weight":
        blob["metadata"] = json.dumps({**meta, "ensemble_weight": 2})
    else:
        blob["metadata"] = json.dumps({**meta, "head": "arcface"})
    bad = tmp_path / f"{case}.pth"
    torch.save(blob, bad)
    with pytest.raises(ValueError, match=match) as info:
        checkpoint.load(bad)
    assert str(bad) in str(info.value)


def test_special_paths_get_precise_errors_without_hanging(tmp_path):
    fifo = tmp_path / "model.pth"
    os.mkfifo(fifo)
    with _Deadline(), pytest.raises(ValueError, match=r"named pipe \(FIFO\), not a regular file"):
        checkpoint.load(fifo)
    (tmp_path / "zero.pth").symlink_to("/dev/zero")
    with _Deadline(), pytest.raises(ValueError, match="character device, not a regular file"):
        checkpoint.load(tmp_path / "zero.pth")
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder, not a model file"):
        checkpoint.load(tmp_path / "folder")
    (tmp_path / "dangling.pth").symlink_to(tmp_path / "gone.pth")
    with pytest.raises(FileNotFoundError, match="a link to a missing file"):
        checkpoint.load(tmp_path / "dangling.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pth")


def test_saving_onto_a_folder_or_a_fifo_is_refused_before_any_change(saved, tmp_path):
    learn, _, _ = saved
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"keep me")
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        checkpoint.save(learn, folder)
    assert (folder / "a.jpg").read_bytes() == b"keep me" and not (tmp_path / "photos.json").exists()
    os.mkfifo(tmp_path / "pipe.pth")
    with _Deadline(), pytest.raises(ValueError, match="named pipe"):
        checkpoint.save(learn, tmp_path / "pipe.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "pipe.pth"]


HOLD_LOCK = """
import fcntl, sys, time
f = open(sys.argv[1], "rb")
fcntl.flock(f, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def test_stale_temporaries_are_removed_and_live_ones_kept(saved, tmp_path):
    learn, _, _ = saved
    target = tmp_path / "model.pth"
    stale = tmp_path / ".model.pth.abc123.tmp"  # what a killed save leaves
    stale.write_bytes(b"x" * 1000)
    stale_json = tmp_path / ".model.pth.json.def456.tmp"
    stale_json.write_bytes(b"{")
    live = tmp_path / ".model.pth.live99.tmp"  # a save running in another process
    live.write_bytes(b"y")
    other = tmp_path / ".other.pth.abc.tmp"  # another file's temporary
    other.write_bytes(b"z")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(live)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        checkpoint.save(learn, target)
        assert not stale.exists() and not stale_json.exists()
        assert live.exists() and other.exists()
    finally:
        holder.kill()
        holder.wait()
    checkpoint.save(learn, target)  # the writer is gone: its file is stale now
    assert not live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pth.abc.tmp", "model.pth", "model.pth.json"]


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
def test_killing_a_process_mid_save_leaves_a_loadable_model_and_the_next_save_cleans_up(saved, tmp_path, fraction):
    """SIGKILL while a ~95 MB model file is being written: the file on disk still loads, and
    the next save of that path removes the killed write's temporary file."""
    from conftest import kill_mid_save

    learn, _, _ = saved
    target = tmp_path / "model.pth"
    env = {**os.environ, "PYTHONPATH": TESTS}
    kill_mid_save(SAVE_CHILD, [str(target), str(tmp_path / "imgs")], fraction, env=env)
    module, _ = train.load(target)
    assert module.metadata["backbone"] == "resnet50"
    meta = json.loads(target.with_name("model.pth.json").read_text())
    assert meta["backbone"] == "resnet50"
    checkpoint.save(learn, target)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


FULL_CHILD = """
import errno, resource, signal, sys
from conftest import draw_image_folder
from pathlib import Path
from utils_cv.similarity import checkpoint, data, train
root = draw_image_folder(Path(sys.argv[2]), per_class=4)
paths, labels = data.list_images(root)
learn = train.create_learner(paths, labels, pretrained=False, image_size=32, valid=0.25, validate_every_epoch=False)
checkpoint.save(learn, sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    checkpoint.save(learn, sys.argv[1])
except OSError as exc:
    print(errno.errorcode[exc.errno], exc)
"""


def test_a_save_that_runs_out_of_room_says_so_and_keeps_the_previous_file(tmp_path):
    """A real write failure of the file system (the size limit of RLIMIT_FSIZE; a full disk,
    ENOSPC, takes the same path)."""
    target = tmp_path / "model.pth"
    env = {**os.environ, "PYTHONPATH": TESTS, "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, "-c", FULL_CHILD, str(target), str(tmp_path / "imgs")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.startswith("EFBIG") and str(target) in out.stdout, out.stdout
    assert "the file is larger than the file system or a size limit allows" in out.stdout
    assert "the previous file at that path is unchanged" in out.stdout
    module, _ = checkpoint.load(target)
    assert module.metadata["image_size"] == 32
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_versions_line_names_the_installed_training_libraries_and_skips_missing_ones():
    import fastai
    import PIL

    from utils_cv.common.versions import versions_line

    line = versions_line()
    assert line.startswith("utils_cv ")
    assert f"torch {torch.__version__}" in line and f"fastai {fastai.__version__}" in line
    assert f"PIL {PIL.__version__}" in line
    assert versions_line("numpy", "no_such_library_here") == f"utils_cv {__import__('utils_cv').__version__}, numpy {np.__version__}"
