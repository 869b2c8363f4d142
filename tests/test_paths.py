import os

import pytest

from utils_cv.common.paths import atomic_write


def test_atomic_write_replaces_whole_or_not_at_all_and_keeps_file_modes(tmp_path):
    target = tmp_path / "model.json"
    with atomic_write(target, "w") as f:
        f.write("first")
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_text() == "first" and target.stat().st_mode & 0o777 == 0o666 & ~umask
    os.chmod(target, 0o640)
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write("half of the sec")
            raise RuntimeError("disk full")
    assert target.read_text() == "first", "an interrupted write leaves the old file"
    assert [p.name for p in tmp_path.iterdir()] == ["model.json"], "no temporary file left behind"
    with atomic_write(target, "w") as f:
        f.write("second")
    assert target.read_text() == "second" and target.stat().st_mode & 0o777 == 0o640
