"""A corpus of bad and unusual image files, generated here, through every entry point that
reads a folder: each file is either used correctly or skipped with its name and a reason."""
from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import draw_image_folder
from utils_cv.similarity import data, features, model, train


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _huge_png_header(width: int, height: int) -> bytes:
    """A valid PNG header announcing width x height pixels (no real pixel data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 10)) + \
        _png_chunk(b"IEND", b"")


def _jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def make_corpus(root: Path) -> dict[str, str]:
    """Writes the corpus under root/<class>/; returns file name -> what must happen
    ("use" or "skip")."""
    draw_image_folder(root, per_class=3)  # circles, squares, stripes: 9 good images
    bad = root / "circles"
    expect = {}
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    (bad / "zero_bytes.jpg").write_bytes(b"")
    expect["zero_bytes.jpg"] = "skip"
    jpeg = _jpeg_bytes(photo)
    (bad / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    expect["truncated.jpg"] = "skip"
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    (bad / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expect["truncated.png"] = "skip"
    (bad / "text.jpg").write_text("this is not a picture\n")
    expect["text.jpg"] = "skip"
    (bad / "bogus_header.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    expect["bogus_header.png"] = "skip"
    (bad / "bomb.png").write_bytes(_huge_png_header(40_000, 40_000))
    expect["bomb.png"] = "skip"
    sq = root / "squares"
    photo.convert("CMYK").save(sq / "cmyk.jpg")
    Image.fromarray((np.arange(40 * 60, dtype=np.uint16).reshape(40, 60) * 20)).save(sq / "sixteen_bit.png")
    photo.convert("P", palette=Image.Palette.ADAPTIVE).save(sq / "palette.png", transparency=0)
    photo.convert("L").save(sq / "gray.jpg")
    photo.convert("RGBA").save(sq / "rgba.png")
    Image.new("RGB", (1, 1), "red").save(sq / "one_pixel.png")
    rotated = photo.copy()
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated.save(sq / "exif_rotated.jpg", exif=exif)
    photo.save(sq / "tiff_photo.tif")
    photo.save(sq / "animated.gif", save_all=True, append_images=[photo.rotate(90)])
    for name in ("cmyk.jpg", "sixteen_bit.png", "palette.png", "gray.jpg", "rgba.png", "one_pixel.png",
                 "exif_rotated.jpg", "tiff_photo.tif", "animated.gif"):
        expect[name] = "use"
    st = root / "stripes"
    os.symlink(st / "loop_b.jpg", st / "loop_a.jpg")  # a symlink loop: a -> b -> a
    os.symlink(st / "loop_a.jpg", st / "loop_b.jpg")
    expect["loop_a.jpg"] = expect["loop_b.jpg"] = "skip"
    os.symlink(root, st / "folder_loop")  # a folder link back to the root: a loop, read once
    os.mkfifo(st / "pipe.jpg")  # opening it would wait for a writer forever
    expect["pipe.jpg"] = "skip"
    locked = st / "no_permission.jpg"
    photo.save(locked)
    os.chmod(locked, 0)
    expect["no_permission.jpg"] = "use" if os.geteuid() == 0 else "skip"  # root reads anything
    latin = os.fsdecode(b"caf\xe9.jpg")  # a name that is not UTF-8
    photo.save(st / latin)
    expect[latin] = "use"
    (root / "empty_class").mkdir()
    (root / "single").mkdir()
    photo.save(root / "single" / "only_one.jpg")
    expect["only_one.jpg"] = "use"
    return expect


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    expect = make_corpus(root)
    yield root, expect
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, 0o644)
    (root / "stripes" / "pipe.jpg").unlink()


def test_scan_uses_or_skips_each_file_with_a_reason(corpus, caplog):
    root, expect = corpus
    with caplog.at_level(logging.WARNING):
        scan = data.scan_images(root, decode=True)
    used = {p.name for p in scan.paths}
    skipped = {p.name: reason for p, reason in scan.skipped}
    for name, what in expect.items():
        if what == "use":
            assert name in used, (name, skipped.get(name))
        else:
            assert name in skipped and skipped[name], name
            assert name in caplog.text or repr(name) in caplog.text
    assert "too large" in skipped["bomb.png"]
    assert "not a regular file" in skipped["pipe.jpg"]
    assert not any("folder_loop" in str(p) for p in scan.paths), "a link back to the root is not read twice"
    assert "link loop" in skipped["folder_loop"]
    assert len(scan.paths) == 9 + sum(v == "use" for v in expect.values())
    assert set(scan.labels) == {"circles", "squares", "stripes", "single"}, "an empty class folder is not a class"


def test_unusual_images_load_as_a_person_sees_them(corpus):
    root, _ = corpus
    sq = root / "squares"
    for name in ("cmyk.jpg", "sixteen_bit.png", "palette.png", "gray.jpg", "rgba.png", "one_pixel.png"):
        im = data.load_image(sq / name)
        assert im.mode == "RGB" and im.size in {(60, 40), (1, 1)}, name
    assert data.load_image(sq / "exif_rotated.jpg").size == (40, 60), "EXIF rotation applied"
    sixteen = np.asarray(data.load_image(sq / "sixteen_bit.png"))
    # values 0..47980 of 65535: scaled to 0..186, not clipped at 255
    assert sixteen.min() == 0 and abs(int(sixteen.max()) - round(47980 / 65535 * 255)) <= 1


def test_one_bad_file_never_aborts_feature_extraction(corpus, caplog):
    root, expect = corpus
    scan = data.scan_images(root, decode=False)  # header check only: truncated files get through
    net, transform = model.create_backbone("efficientnet_lite0", pretrained=False, image_size=32)
    with caplog.at_level(logging.WARNING):
        result = features.FeatureExtractor(net, transform, batch_size=4).extract(scan.paths, on_error="skip",
                                                                               progress=False)
    feats, kept = result.features, result.kept
    dropped = {scan.paths[i].name for i in set(range(len(scan.paths))) - set(kept.tolist())}
    assert {p.name for p, _ in result.skipped} == dropped
    assert dropped <= {n for n, w in expect.items() if w == "skip"}
    assert "truncated.jpg" in dropped or "truncated.jpg" not in {p.name for p in scan.paths}
    assert len(feats) == len(kept) and np.isfinite(feats).all()
    for name in dropped:
        assert name in caplog.text


def test_training_skips_undecodable_images_and_reports_them(corpus, caplog):
    root, _ = corpus
    scan = data.scan_images(root, decode=False)
    with caplog.at_level(logging.WARNING):
        learner = train.create_learner(scan.paths, scan.labels, pretrained=False, image_size=32, batch_size=4,
                                       valid=0.25, validate_every_epoch=False)
    assert "truncated.jpg" in caplog.text
    result = train.fine_tune(learner, 1, freeze_epochs=0, progress=False)  # runs to the end
    assert {p.name for p, _ in result.skipped} >= {"truncated.jpg"}
