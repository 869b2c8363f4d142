import csv
import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils_cv.similarity import data

DATA_ROOT = Path(__file__).resolve().parents[1] / "data"


def test_list_images_labels_and_order(image_folder):
    paths, labels = data.list_images(image_folder)
    assert len(paths) == 12
    assert sorted(set(labels)) == ["circles", "squares", "stripes"]
    assert paths == sorted(paths)
    assert all(p.parent.name == label for p, label in zip(paths, labels))


def test_label_is_first_subfolder_and_search_is_recursive(image_folder):
    deep = image_folder / "circles" / "more" / "deeper"
    deep.mkdir(parents=True)
    Image.new("RGB", (20, 20), "red").save(deep / "x.png")
    paths, labels = data.list_images(image_folder)
    assert labels[paths.index(deep / "x.png")] == "circles"
    assert len(paths) == 13


def test_bad_files_are_skipped_and_reported(image_folder, caplog):
    (image_folder / "circles" / "notes.jpg").write_text("not an image")
    (image_folder / "circles" / "empty.png").write_bytes(b"")
    (image_folder / "squares" / "readme.txt").write_text("hello")
    Image.new("RGB", (8, 8)).save(image_folder / "at_root.jpg")
    with caplog.at_level(logging.WARNING, logger="utils_cv"):
        scan = data.scan_images(image_folder)
    assert len(scan.paths) == 12
    skipped = {p.name: reason for p, reason in scan.skipped}
    assert set(skipped) == {"notes.jpg", "empty.png", "readme.txt", "at_root.jpg"}
    assert "not a readable image" in skipped["notes.jpg"]
    assert "sub-folder" in skipped["at_root.jpg"]
    assert "notes.jpg" in caplog.text and "empty.png" in caplog.text


def test_missing_and_empty_folders_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.list_images(tmp_path / "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="No usable image"):
        data.list_images(tmp_path / "empty")
    (tmp_path / "f.jpg").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        data.list_images(tmp_path / "f.jpg")


def test_load_image_composites_transparency_on_white(tmp_path):
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[2:5, 2:5] = (255, 0, 0, 255)  # opaque red square, the rest fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    out = np.asarray(data.load_image(tmp_path / "t.png"))
    assert out.shape == (10, 10, 3)
    assert (out[0, 0] == 255).all(), "transparent background must become white, not black"
    assert tuple(out[3, 3]) == (255, 0, 0)


def test_load_image_applies_exif_rotation(tmp_path):
    im = Image.new("RGB", (40, 20), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert data.load_image(tmp_path / "r.jpg").size == (20, 40)


def test_default_dataset_is_large_coherent_and_documented():
    root = data.default_dataset()
    paths, labels = data.list_images(root)
    counts = {c: labels.count(c) for c in set(labels)}
    assert len(paths) >= 450
    assert len(counts) >= 10
    assert min(counts.values()) >= 18, counts
    assert all(p.suffix == ".jpg" for p in paths)
    total = sum(p.stat().st_size for p in paths)
    assert total <= 15 * 1024 * 1024
    with open(DATA_ROOT / "MANIFEST.csv", newline="", encoding="utf-8") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    on_disk = {str(p.relative_to(DATA_ROOT)) for p in paths}
    assert set(rows) == on_disk, "every image has exactly one manifest row"
    for p in paths[::25]:
        row = rows[str(p.relative_to(DATA_ROOT))]
        assert row["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
        assert row["licence"] not in ("", "unknown")
        assert row["source_package"].split()[0] in {"tuxpaint-stamps-default", "gcompris-qt-data"}
