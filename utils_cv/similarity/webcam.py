"""A query image from a camera: a local one through OpenCV, the browser's when Jupyter runs
on a remote server, or a file when there is no camera at all.

``capture()`` tries them in that order of preference and says in one line which it used::

    shot = webcam.capture(camera=0, browser=None, fallback=None)
    print(shot.description)       # e.g. "Query from local camera 0 (640x480)."
    shot.image                    # PIL.Image, RGB

The browser camera is a small anywidget (``BrowserCamera``): it shows the camera preview
in the notebook and a *Capture* button; browsers allow cameras only on https pages or on
localhost (an SSH tunnel to a remote Jupyter counts as localhost).
"""
from __future__ import annotations

import base64
import io
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from utils_cv.similarity.data import default_dataset, list_images, load_image

__all__ = ["BrowserCamera", "Capture", "capture", "read_camera"]

log = logging.getLogger(__name__)


@dataclass
class Capture:
    """One query image and where it came from."""

    image: Image.Image
    source: str  # "camera", "browser" or "file"
    description: str  # one line for the reader


def read_camera(camera: int | str = 0, warmup: int = 5) -> np.ndarray | None:
    """One (H, W, 3) uint8 RGB frame from an OpenCV source, or None when it gives none.

    Args:
        camera: a device index (0 is the first camera), or a video file / stream URL.
        warmup: frames read before the one returned; cameras send dark frames while their
            exposure settles. Video files simply skip ahead (the last frame read is kept when
            the file is shorter).
    """
    import cv2

    if isinstance(camera, bool) or not isinstance(camera, (int, str, Path)):
        raise ValueError(f"The 'camera' parameter must be a device index or a video path/URL. Got {camera!r} instead.")
    if isinstance(camera, int) and sys.platform.startswith("linux") and not Path(f"/dev/video{camera}").exists():
        log.info("no /dev/video%d: no local camera %d", camera, camera)
        return None
    cap = cv2.VideoCapture(str(camera) if isinstance(camera, Path) else camera)
    try:
        if not cap.isOpened():
            return None
        frame = None
        for _ in range(max(1, warmup + 1)):
            ok, bgr = cap.read()
            if not ok:
                break
            frame = bgr
        return None if frame is None else np.ascontiguousarray(frame[:, :, ::-1])
    finally:
        cap.release()


def _browser_class():
    import anywidget
    import traitlets

    class BrowserCamera(anywidget.AnyWidget):
        """The browser's camera in a notebook: a live preview and a *Capture* button.

        After *Capture*, ``.image`` holds the frame (PIL, RGB); ``.error`` says why there
        is no preview (no camera, permission denied, a page that is not https/localhost).
        """

        _esm = """
        export default {
          render({ model, el }) {
            const video = document.createElement("video");
            video.autoplay = true; video.playsInline = true; video.muted = true; video.width = 320;
            const button = document.createElement("button");
            button.textContent = "Capture";
            const status = document.createElement("span");
            status.style.marginLeft = "0.5em";
            let stream = null;
            if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
              const msg = "This page cannot use a camera (it needs https or localhost).";
              status.textContent = msg; model.set("error", msg); model.save_changes();
            } else {
              navigator.mediaDevices.getUserMedia({ video: true }).then((s) => {
                stream = s; video.srcObject = s;
              }).catch((err) => {
                status.textContent = "No camera: " + err; model.set("error", String(err)); model.save_changes();
              });
            }
            button.onclick = () => {
              if (!video.videoWidth) { status.textContent = "No frame yet."; return; }
              const canvas = document.createElement("canvas");
              canvas.width = video.videoWidth; canvas.height = video.videoHeight;
              canvas.getContext("2d").drawImage(video, 0, 0);
              model.set("frame", canvas.toDataURL("image/jpeg", 0.92));
              model.save_changes();
              status.textContent = "Captured " + canvas.width + "x" + canvas.height + ".";
            };
            el.append(video, document.createElement("br"), button, status);
            return () => { if (stream) stream.getTracks().forEach((t) => t.stop()); };
          }
        };
        """
        frame = traitlets.Unicode("").tag(sync=True)  # a data: URL (JPEG) set by the browser
        error = traitlets.Unicode("").tag(sync=True)

        @property
        def image(self) -> Image.Image | None:
            """The captured frame, or None before the first *Capture*."""
            if not self.frame:
                return None
            header, _, payload = self.frame.partition(",")
            if not header.startswith("data:image/") or ";base64" not in header:
                raise ValueError(f"BrowserCamera.frame is not a base64 image data URL (starts {self.frame[:30]!r}).")
            return Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB")

    return BrowserCamera


def __getattr__(name):  # BrowserCamera is built on first use: anywidget loads only when wanted
    if name == "BrowserCamera":
        cls = _browser_class()
        globals()["BrowserCamera"] = cls
        return cls
    raise AttributeError(name)


def capture(camera: int | str | None = 0, browser=None, fallback=None) -> Capture:
    """A query image: the browser capture if one was taken, else a frame of ``camera``
    (OpenCV), else the image file ``fallback`` (None: the first image of the default data
    set). Logs and returns one line saying which source was used.

    Args:
        camera: OpenCV device index or video path/URL; None skips the local camera.
        browser: a :class:`BrowserCamera` shown earlier in the notebook, or None.
        fallback: an image file used when no camera gives a frame.
    """
    if browser is not None and browser.image is not None:
        im = browser.image
        return _done(Capture(im, "browser", f"Query from the browser camera ({im.width}x{im.height})."))
    tried = []
    if browser is not None:
        tried.append(f"browser camera: no capture yet{' (' + browser.error + ')' if browser.error else ''}")
    if camera is not None:
        frame = read_camera(camera)
        what = f"local camera {camera}" if isinstance(camera, int) else f"video source {str(camera)!r}"
        if frame is not None:
            return _done(Capture(Image.fromarray(frame), "camera",
                                 f"Query from {what} ({frame.shape[1]}x{frame.shape[0]})."))
        tried.append(f"{what}: no frame")
    if fallback is None:
        paths, _ = list_images(default_dataset())
        fallback = paths[0]
    fallback = Path(fallback)
    if not fallback.is_file():
        raise FileNotFoundError(f"The 'fallback' image {str(fallback)!r} does not exist; give an image file path.")
    im = load_image(fallback)
    reason = "; ".join(tried) if tried else "no camera requested"
    return _done(Capture(im, "file", f"No camera frame ({reason}): query from the file {str(fallback)!r}."))


def _done(shot: Capture) -> Capture:
    log.info(shot.description)
    return shot
