"""Shared fixtures: tiny image folders drawn in-process, seeded, in a temp dir."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("UTILS_CV_OFFLINE", "1")  # tests never touch the network


def _draw(kind: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 120, 3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    a, b = rng.integers(4, 16, 2)
    if kind == "circles":
        d.ellipse([a, b, size - a, size - b], fill=fg)
    elif kind == "squares":
        d.rectangle([a, b, size - b, size - a], fill=fg)
    else:  # stripes
        w = int(rng.integers(3, 8))
        for x in range(int(a) % w, size, 2 * w):
            d.rectangle([x, 0, x + w - 1, size], fill=fg)
    return im


def draw_image_folder(root: Path, classes=("circles", "squares", "stripes"), per_class: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _draw(c, rng).save(root / c / f"{c}_{i}.jpg", quality=95)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """3 classes x 4 drawn 64-px JPEGs (circles, squares, stripes), seeded."""
    return draw_image_folder(tmp_path / "images")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """An empty UTILS_CV_CACHE for this test."""
    path = tmp_path / "cache"
    monkeypatch.setenv("UTILS_CV_CACHE", str(path))
    return path


def write_video(path: Path, frames, fps: int = 10) -> Path:
    """An MJPG video of ``frames`` (a list of (H, W, 3) uint8 RGB arrays): a camera stand-in
    that OpenCV opens like a device."""
    import cv2

    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened(), "OpenCV cannot write MJPG video here"
    for rgb in frames:
        writer.write(np.ascontiguousarray(rgb[:, :, ::-1]))
    writer.release()
    return path


class PickleExploit:
    """Unpickling this creates the file ``marker``: proof that a loader ran pickled code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def kill_mid_save(script: str, args: list[str], fraction: float, env: dict | None = None) -> None:
    """Run ``script``, which saves in a loop printing "saved" after each save; time three
    saves, then SIGKILL it ``fraction`` of the way into the next one."""
    import signal
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True, env=env)
    try:
        stamps = []
        for _ in range(3):
            assert child.stdout.readline().strip() == "saved"
            stamps.append(time.perf_counter())
        time.sleep(fraction * (stamps[-1] - stamps[0]) / 2)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
