"""Image folders: listing images with their labels, loading them the same way everywhere.

A data set is a folder with one sub-folder per class (``root/<label>/.../image.jpg``). The
label of an image is the first sub-folder under ``root``; deeper folders are searched too.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_PIL_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "BMP"}

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageScan",
    "default_dataset",
    "list_images",
    "load_image",
    "scan_images",
]


@dataclass
class ImageScan:
    """What :func:`scan_images` found: aligned ``paths`` and ``labels``, and what it skipped."""

    paths: list[Path]
    labels: list[str]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))


def _check_header(path: Path) -> str | None:
    """None when ``path`` opens as a supported image, else the reason it does not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                fmt = im.format
                w, h = im.size
    except Image.DecompressionBombError as exc:
        return f"too large to decode safely ({exc})"
    except Image.DecompressionBombWarning as exc:
        return f"too large to decode safely ({exc})"
    except PermissionError:
        return "no permission to read it"
    except Exception as exc:  # noqa: BLE001 - any decoder failure means 'not an image we can use'
        return f"not a readable image ({type(exc).__name__}: {exc})"
    if fmt not in _PIL_FORMATS:
        return f"unsupported image format {fmt!r} (supported: JPEG, PNG, WebP, BMP)"
    if w < 1 or h < 1:
        return "empty image"
    return None


def scan_images(root: str | os.PathLike, check: bool = True) -> ImageScan:
    """List the images under ``root`` with their labels, recording what was skipped and why.

    Args:
        root: folder with one sub-folder per class.
        check: open each file's header and skip those that are not readable images.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a folder.
        ValueError: no usable image was found.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"Image folder {str(root)!r} does not exist. Pass a folder with one sub-folder per class.")
    if not root.is_dir():
        raise FileNotFoundError(f"{str(root)!r} is a file, not a folder. Pass a folder with one sub-folder per class.")
    paths, labels, skipped = [], [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        here = Path(dirpath)
        rel = here.relative_to(root)
        for name in sorted(filenames):
            path = here / name
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                if not name.startswith("."):
                    skipped.append((path, f"extension not in {', '.join(IMAGE_EXTENSIONS)}"))
                continue
            if not rel.parts:
                skipped.append((path, "lies directly in the root folder; put it in a sub-folder named after its class"))
                continue
            reason = _check_header(path) if check else None
            if reason:
                skipped.append((path, reason))
                continue
            paths.append(path)
            labels.append(rel.parts[0])
    for path, reason in skipped:
        logger.warning("skipped %s: %s", path, reason)
    if not paths:
        raise ValueError(
            f"No usable image found under {str(root)!r} ({len(skipped)} file(s) skipped). "
            f"Expected {root}/<class name>/<image>{'|'.join(IMAGE_EXTENSIONS)}."
        )
    logger.info("found %d images in %d classes under %s (%d skipped)", len(paths), len(set(labels)), root, len(skipped))
    return ImageScan(paths, labels, skipped)


def list_images(root: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """Images under ``root`` and their labels (the first sub-folder's name), sorted by path.

    Unreadable or non-image files are skipped and reported through ``logging`` with their
    path and the reason; :func:`scan_images` also returns that list.
    """
    scan = scan_images(root)
    return scan.paths, scan.labels


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image as a person sees it: EXIF rotation applied, transparency on white, RGB."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("P", "PA") and ("transparency" in im.info or im.mode == "PA"):
            im = im.convert("RGBA")
        elif im.mode == "LA":
            im = im.convert("RGBA")
        if im.mode == "RGBA":
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, im).convert("RGB")
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float32)
            peak = 65535.0 if arr.max() > 255 else 255.0
            return Image.fromarray((arr / peak * 255).clip(0, 255).astype(np.uint8)).convert("RGB")
        return im.convert("RGB")


def default_dataset() -> Path:
    """The small data set that ships in ``data/similarity`` (13 classes, 466 images).

    ``$UTILS_CV_DATA`` points elsewhere when the package is installed without the repository.
    """
    env = os.environ.get("UTILS_CV_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "data" / "similarity"
    if not path.is_dir():
        raise FileNotFoundError(
            f"Default data set not found at {str(path)!r}. It ships in the repository's data/similarity; "
            "set UTILS_CV_DATA to its location when utils_cv is installed elsewhere."
        )
    return path
