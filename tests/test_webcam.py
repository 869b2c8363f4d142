import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_video
from utils_cv.similarity import data, webcam


def _write_video(path: Path, frames: int = 8, size=(80, 60)) -> Path:
    """A red square moving on white: the "camera" of the test."""
    images = []
    for i in range(frames):
        rgb = np.full((size[1], size[0], 3), 255, np.uint8)
        rgb[10:50, 10 + i:50 + i] = (255, 0, 0)
        images.append(rgb)
    return write_video(path, images)


def test_a_video_source_gives_an_rgb_frame_through_opencv(tmp_path):
    video = _write_video(tmp_path / "camera.avi")
    frame = webcam.read_camera(str(video))
    assert frame.shape == (60, 80, 3) and frame.dtype == np.uint8
    r, g, b = frame[30, 30]
    assert r > 200 and g < 60 and b < 60, "the frame is RGB (OpenCV's BGR converted)"
    shot = webcam.capture(camera=str(video))
    assert shot.source == "camera" and shot.image.size == (80, 60)
    assert "camera.avi" in shot.description and "80x60" in shot.description


def test_no_camera_falls_back_to_a_file_and_says_so(tmp_path, image_folder, caplog):
    caplog.set_level("INFO")
    paths, _ = data.list_images(image_folder)
    missing = tmp_path / "no_such_camera.avi"
    shot = webcam.capture(camera=str(missing), fallback=paths[0])
    assert shot.source == "file" and shot.image.size == (64, 64)
    assert "no frame" in shot.description and str(paths[0]) in shot.description
    assert shot.description in caplog.text
    assert webcam.read_camera(97) is None  # no such device
    default = webcam.capture(camera=None)
    assert default.source == "file" and "no camera requested" in default.description
    assert str(data.default_dataset()) in default.description
    with pytest.raises(FileNotFoundError, match="fallback"):
        webcam.capture(camera=None, fallback=tmp_path / "nope.jpg")
    with pytest.raises(ValueError, match="'camera'"):
        webcam.read_camera(1.5)


def test_the_browser_camera_widget_decodes_what_the_browser_sends(image_folder):
    cam = webcam.BrowserCamera()
    assert cam.image is None
    shot = webcam.capture(camera=None, browser=cam, fallback=next(image_folder.rglob("*.jpg")))
    assert shot.source == "file" and "browser camera: no capture yet" in shot.description
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (0, 0, 255)).save(buf, format="JPEG")
    cam.frame = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()  # what the JS sets
    assert cam.image.size == (32, 24)
    shot = webcam.capture(camera=None, browser=cam)
    assert shot.source == "browser" and "32x24" in shot.description
    assert np.asarray(shot.image)[12, 16, 2] > 200
    cam.frame = "hello"
    with pytest.raises(ValueError, match="data URL"):
        cam.image
