import csv
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import draw_image_folder
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
    assert "sub-folder named after its class" in skipped["at_root.jpg"]
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


# ---------------------------------------------------------------------------- folders and formats
def _names(paths, root):
    return [str(p.relative_to(root)) for p in paths]


def test_listing_keeps_the_walk_order_the_published_splits_were_drawn_on(tmp_path):
    # a folder's own files by name, then its sub-folders by name (os.walk top-down)
    for rel in ("a/z.png", "a/b/x.png", "a/c.png", "b/y.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), "red").save(tmp_path / rel)
    paths, labels = data.list_images(tmp_path)
    assert _names(paths, tmp_path) == ["a/c.png", "a/z.png", "a/b/x.png", "b/y.png"]
    assert labels == ["a", "a", "a", "b"]


def test_a_plain_folder_lists_without_labels(tmp_path):
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 80, 0, 0)).save(tmp_path / f"photo_{i}.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    paths, labels = data.list_images(tmp_path)
    assert labels is None and _names(paths, tmp_path) == ["photo_0.jpg", "photo_1.jpg", "photo_2.jpg"]
    assert data.scan_images(tmp_path).classes == []
    with pytest.raises(ValueError, match="no class sub-folder.*labelled=False"):
        data.list_images(tmp_path, labelled=True)
    with pytest.raises(ValueError, match="'labels' parameter is None.*one sub-folder per class"):
        data.split_by_image(paths, labels)


def test_mixed_layout_reads_class_folders_unless_told_otherwise(image_folder):
    Image.new("RGB", (16, 16), "red").save(image_folder / "stray.jpg")
    scan = data.scan_images(image_folder)
    assert len(scan.paths) == 12 and scan.classes == ["circles", "squares", "stripes"]
    assert [(p.name, "labelled=False" in r) for p, r in scan.skipped] == [("stray.jpg", True)]
    paths, labels = data.list_images(image_folder, labelled=False)
    assert labels is None and len(paths) == 13 and paths[0].name == "stray.jpg"
    with pytest.raises(ValueError, match="'labelled'"):
        data.list_images(image_folder, labelled="yes")


def test_tiff_gif_webp_bmp_and_avif_are_read(tmp_path):
    from PIL import features as pil_features

    cls = tmp_path / "formats"
    cls.mkdir()
    red = Image.new("RGB", (20, 10), (255, 0, 0))
    red.save(cls / "a.tif")
    Image.fromarray(np.full((10, 20), 40000, dtype=np.uint16)).save(cls / "b16.tiff")
    red.save(cls / "c.gif", save_all=True, append_images=[Image.new("RGB", (20, 10), (0, 0, 255))], duration=100)
    red.save(cls / "d.webp")
    red.save(cls / "e.bmp")
    expected = ["a.tif", "b16.tiff", "c.gif", "d.webp", "e.bmp"]
    if pil_features.check("avif"):
        red.save(cls / "f.avif")
        expected.append("f.avif")
    scan = data.scan_images(tmp_path, decode=True)
    assert [p.name for p in scan.paths] == expected and scan.skipped == []
    gif = np.asarray(data.load_image(cls / "c.gif"))
    assert gif.shape == (10, 20, 3) and gif[5, 5, 0] > 200 and gif[5, 5, 2] < 50, "the first frame of a GIF"
    assert np.asarray(data.load_image(cls / "b16.tiff")).mean() == pytest.approx(40000 / 65535 * 255, abs=1)


def test_heic_is_read_through_pillow_heif(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    (tmp_path / "phone").mkdir()
    pillow_heif.from_pillow(Image.new("RGB", (32, 16), (0, 200, 0))).save(tmp_path / "phone" / "IMG_0001.HEIC")
    paths, labels = data.list_images(tmp_path)
    assert [p.name for p in paths] == ["IMG_0001.HEIC"] and labels == ["phone"]
    rgb = np.asarray(data.load_image(paths[0]))
    assert rgb.shape == (16, 32, 3) and abs(int(rgb[8, 16, 1]) - 200) < 20


def test_a_fifo_named_like_a_photo_is_skipped_not_opened(image_folder):
    import threading

    fifo = image_folder / "circles" / "photo.jpg"
    os.mkfifo(fifo)
    out = {}

    def read_folder():
        out["scan"] = data.scan_images(image_folder, decode=True)
        with pytest.raises(OSError, match="FIFO, not a regular file"):
            data.load_image(fifo)
        out["decodable"] = data.decodable([fifo])

    reader = threading.Thread(target=read_folder, daemon=True)
    reader.start()
    reader.join(10)
    blocked = reader.is_alive()
    while reader.is_alive():  # a reader stuck in open() is released by a writer that opens and closes
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        reader.join(0.1)
    assert not blocked, "a FIFO in the folder blocked the reader"
    scan = out["scan"]
    assert len(scan.paths) == 12
    assert [(p.name, r) for p, r in scan.skipped] == [("photo.jpg", "a FIFO, not a regular file; only regular "
                                                                     "files are read")]
    kept, _, skipped = out["decodable"]
    assert kept == [] and "FIFO" in skipped[0][1]


def test_symlinked_class_folders_are_followed_once_and_loops_end(tmp_path, caplog):
    root = draw_image_folder(tmp_path / "set", classes=("circles",), per_class=2)
    outside = draw_image_folder(tmp_path / "elsewhere", classes=("squares",), per_class=3)
    os.symlink(outside / "squares", root / "squares")  # a class folder kept elsewhere
    os.symlink(outside / "squares", root / "squares_again")  # the same folder a second time
    os.symlink(root, root / "circles" / "loop")  # back to the top: a loop
    os.symlink(root / "nowhere", root / "circles" / "broken.jpg")
    with caplog.at_level(logging.WARNING, logger="utils_cv"):
        scan = data.scan_images(root)
    assert scan.labels == ["circles"] * 2 + ["squares"] * 3
    assert all(p.parent.name == label for p, label in zip(scan.paths, scan.labels)), "paths as listed, not resolved"
    reasons = {p.name: r for p, r in scan.skipped}
    assert set(reasons) == {"loop", "squares_again", "broken.jpg"}
    assert "link loop" in reasons["loop"] and "read once" in reasons["squares_again"]
    assert "broken symbolic link" in reasons["broken.jpg"]
    assert "squares_again" in caplog.text


def test_near_constant_images_are_reported_and_kept(image_folder, caplog):
    blank = np.zeros((30, 30, 4), dtype=np.uint8)  # fully transparent: white once composited
    Image.fromarray(blank, "RGBA").save(image_folder / "squares" / "blank.png")
    with caplog.at_level(logging.WARNING, logger="utils_cv"):
        scan = data.scan_images(image_folder, decode=True)
    assert [p.name for p in scan.near_constant] == ["blank.png"]
    assert image_folder / "squares" / "blank.png" in scan.paths and len(scan.paths) == 13
    assert "blank.png" in caplog.text and "near-constant" in caplog.text
    assert not data.is_near_constant(data.load_image(scan.paths[0]))
    assert data.scan_images(image_folder).near_constant == [], "only reported when decoding"


# ---------------------------------------------------------------------------- labels, splits, sets
LABELS = ["a"] * 10 + ["b"] * 5 + ["c"] * 2 + ["d"] * 8
PATHS = [f"img{i}.jpg" for i in range(len(LABELS))]


def test_split_by_image_is_stratified_and_reproducible():
    tr, te = data.split_by_image(PATHS, LABELS, test_size=0.2, seed=1)
    assert len(set(tr) & set(te)) == 0 and len(tr) + len(te) == len(LABELS)
    y = np.array(LABELS)
    for c in "abcd":
        assert (y[te] == c).sum() >= 1 and (y[tr] == c).sum() >= 1
    assert (y[te] == "a").sum() == 2
    assert te.tolist() == [4, 8, 11, 16, 18, 20], "the split the published numbers were drawn on"
    tr2, te2 = data.split_by_image(PATHS, np.array(LABELS), test_size=np.float32(0.2), seed=1)
    assert te.tolist() == te2.tolist()
    with pytest.raises(ValueError, match="test_size"):
        data.split_by_image(PATHS, LABELS, test_size=1.5)
    with pytest.raises(ValueError, match="aligned"):
        data.split_by_image(PATHS[:3], LABELS)


@pytest.mark.parametrize("missing", [None, float("nan"), np.nan, "", "  ", "pd.NA", "pd.NaT"])
def test_a_missing_label_is_one_clear_error_everywhere(missing):
    import pandas as pd

    missing = {"pd.NA": pd.NA, "pd.NaT": pd.NaT}.get(missing, missing)
    labels = list(LABELS)
    labels[3] = missing
    for call in (lambda: data.split_by_image(PATHS, labels), lambda: data.split_by_class(PATHS, labels),
                 lambda: data.comparative_sets(labels, num_negatives=5),
                 lambda: data.check_labels(pd.Series(labels, dtype=object), "query_labels")):
        with pytest.raises(ValueError, match=r"'(query_)?labels' parameter has a missing label .* at position 3"):
            call()


def test_check_labels_accepts_arrays_and_refuses_shapes():
    assert data.check_labels(np.array([1.0, 2.0])).tolist() == [1.0, 2.0]
    assert data.check_labels(("x", "y")).tolist() == ["x", "y"]
    with pytest.raises(ValueError, match="position 1 and 1 more"):
        data.check_labels(np.array([0.0, np.nan, np.nan]))
    with pytest.raises(ValueError, match="position 2"):
        data.check_labels(np.array(["a", "b", ""]))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        data.check_labels([])
    with pytest.raises(ValueError, match="a string"):
        data.check_labels("abc")


def test_split_by_class_is_disjoint():
    tr, te = data.split_by_class(PATHS, LABELS, test_classes=0.5, seed=0)
    y = np.array(LABELS)
    assert set(y[tr]).isdisjoint(set(y[te]))
    assert len(set(y[te])) == 2
    tr, te = data.split_by_class(PATHS, LABELS, test_classes=["c"])
    assert set(y[te]) == {"c"}
    with pytest.raises(ValueError, match="unknown classes"):
        data.split_by_class(PATHS, LABELS, test_classes=["zzz"])


def test_comparative_sets_reproducible_without_repeats():
    sets = data.comparative_sets(LABELS, num_negatives=10, seed=4)
    again = data.comparative_sets(LABELS, num_negatives=10, seed=4)
    other = data.comparative_sets(LABELS, num_negatives=10, seed=5)
    assert len(sets) == len(LABELS)
    y = np.array(LABELS)
    for s, t in zip(sets, again):
        assert s.query == t.query and s.positive == t.positive and s.negatives.tolist() == t.negatives.tolist()
        assert s.positive != s.query and y[s.positive] == y[s.query]
        assert len(set(s.negatives.tolist())) == 10
        assert (y[s.negatives] != y[s.query]).all()
    assert any(s.negatives.tolist() != o.negatives.tolist() for s, o in zip(sets, other))


def test_comparative_sets_clear_errors():
    with pytest.raises(ValueError, match="single image"):
        data.comparative_sets(["a", "a", "b"], num_negatives=1)
    with pytest.raises(ValueError, match="fewer than num_negatives"):
        data.comparative_sets(LABELS, num_negatives=99)
    with pytest.raises(ValueError, match="one sub-folder per class"):
        data.comparative_sets(None)


def test_split_by_class_by_name_takes_the_last_classes_as_test():
    labels = ["003.c"] * 2 + ["001.a"] * 3 + ["002.b"] * 2 + ["004.d"] * 2
    paths = [f"{i}.jpg" for i in range(len(labels))]
    tr, te = data.split_by_class(paths, labels, test_classes=0.5, by_name=True, seed=123)
    assert sorted({labels[i] for i in te}) == ["003.c", "004.d"]
    assert sorted({labels[i] for i in tr}) == ["001.a", "002.b"]


def test_disjoint_split_has_no_class_in_common():
    from utils_cv.similarity import experiment

    labels = [f"{c:03d}" for c in range(10) for _ in range(3)]
    paths = [f"{i}.jpg" for i in range(len(labels))]
    s = experiment.disjoint_split(paths, labels, test_classes=0.5, valid_classes=0.2, seed=0)
    classes = {k: set(v[1]) for k, v in s.items()}
    assert classes["test"] == {f"{c:03d}" for c in range(5, 10)}
    assert len(classes["valid"]) == 1 and len(classes["train"]) == 4
    assert not (classes["train"] & classes["valid"]) and not (classes["train"] | classes["valid"]) & classes["test"]
    assert sum(len(v[0]) for v in s.values()) == 30
