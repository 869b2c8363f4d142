"""Image folders: listing images with their labels, loading them the same way everywhere.

Two layouts are read:

* labelled: one sub-folder per class (``root/<label>/.../image.jpg``); the label of an image
  is the first sub-folder under ``root``, deeper folders are searched too;
* plain: images directly in ``root`` (and possibly below), no labels (``None``); what does
  not need labels (features, index, search, duplicates) works on it.

A folder holding images at the top *and* in sub-folders is read as labelled (the sub-folders
name the classes) and the top-level images are skipped with that reason: the data sets this
library ships and reads are laid out that way, and a stray file beside the class folders is
more likely than a photo collection whose sub-folders are not classes. ``labelled=False``
takes every image without labels.

Only regular files are opened (a FIFO named ``photo.jpg`` would block a reader forever);
symbolic links to files and folders are followed, each real folder is visited once, so a
link loop ends. Everything left out is listed with its reason.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, features as pil_features

from utils_cv.similarity.splits import ComparativeSet, check_labels, comparative_sets, split_by_class, split_by_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".heif", ".avif")
_HEIF_EXTENSIONS = (".heic", ".heif", ".avif")
_PIL_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF", "HEIF", "AVIF"}
NEAR_CONSTANT_STD = 2.0  # grey levels (0-255); below this an image shows next to nothing

__all__ = [
    "IMAGE_EXTENSIONS",
    "ComparativeSet",
    "ImageScan",
    "check_labels",
    "comparative_sets",
    "decodable",
    "default_dataset",
    "is_near_constant",
    "list_images",
    "load_image",
    "scan_images",
    "split_by_class",
    "split_by_image",
]


@dataclass
class ImageScan:
    """What :func:`scan_images` found: aligned ``paths`` and ``labels`` (None for a plain
    folder), what it skipped and why, and the images it kept that show next to nothing."""

    paths: list[Path]
    labels: list[str] | None
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason)
    near_constant: list[Path] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels)) if self.labels is not None else []


@functools.lru_cache(maxsize=None)
def _heif_support() -> bool:
    """Register pillow-heif's HEIC/AVIF openers the first time such a file is met (an
    optional extra: importing it costs time and most folders hold no HEIC)."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    if not pil_features.check("avif") and hasattr(pillow_heif, "register_avif_opener"):
        pillow_heif.register_avif_opener()
    return True


def _missing_codec(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix not in _HEIF_EXTENSIONS or _heif_support() or (suffix == ".avif" and pil_features.check("avif")):
        return None
    return "HEIC/HEIF/AVIF images need the pillow-heif package (pip install pillow-heif)"


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder")):
        if test(mode):
            return kind
    return "special file"


def _open_regular(path) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file. O_NONBLOCK makes opening a
    FIFO return at once (instead of waiting for a writer) so it can be refused."""
    f = open(path, "rb", opener=lambda name, flags: os.open(name, flags | getattr(os, "O_NONBLOCK", 0)))
    try:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"a {_file_kind(mode)}, not a regular file", str(path))
    except BaseException:
        f.close()
        raise
    return f


def _check_header(path: Path, decode: bool = False) -> str | None:
    """None when ``path`` opens as a supported image, else the reason it does not.

    ``decode``: also decode the pixels (catches truncated files whose header is intact)."""
    missing = _missing_codec(path)
    if missing:
        return missing
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _open_regular(path) as f, Image.open(f) as im:
                fmt = im.format
                w, h = im.size
                if decode and fmt in _PIL_FORMATS:
                    im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return f"too large to decode safely ({exc})"
    except PermissionError:
        return "no permission to read it"
    except Exception as exc:  # noqa: BLE001 - any decoder failure means 'not an image we can use'
        return f"not a readable image ({type(exc).__name__}: {exc})"
    if fmt not in _PIL_FORMATS:
        return f"unsupported image format {fmt!r} (supported: {', '.join(sorted(_PIL_FORMATS))})"
    if w < 1 or h < 1:
        return "empty image"
    return None


def _walk(root: Path, skipped: list) -> list[Path]:
    """Regular files under ``root`` with an image extension, in ``os.walk`` order (a folder's
    files by name, then its sub-folders by name). Links are followed; each real folder is
    visited once. Other entries go to ``skipped`` with their reason."""
    found: list[Path] = []
    seen: dict[tuple[int, int], Path] = {}

    def visit(folder: Path, key: tuple[int, int]) -> None:
        seen[key] = folder
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            skipped.append((folder, f"cannot list this folder ({exc.strerror})"))
            return
        folders = []
        for entry in entries:
            path = folder / entry.name
            try:
                st = os.stat(path)  # follows links: the type of what the link points to
            except OSError as exc:
                reason = {errno.ELOOP: "symbolic link loop", errno.ENOENT: "broken symbolic link (target missing)"}
                skipped.append((path, reason.get(exc.errno, f"cannot read it ({exc.strerror})")))
                continue
            if stat.S_ISDIR(st.st_mode):
                folders.append((path, (st.st_dev, st.st_ino)))
            elif not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                if not entry.name.startswith("."):
                    skipped.append((path, f"extension not in {', '.join(IMAGE_EXTENSIONS)}"))
            elif not stat.S_ISREG(st.st_mode):
                skipped.append((path, f"a {_file_kind(st.st_mode)}, not a regular file; only regular files are read"))
            else:
                found.append(path)
        for path, sub_key in folders:
            if sub_key in seen:
                skipped.append((path, f"the folder {str(seen[sub_key])!r} again (a link loop or a second link to "
                                      "it); read once"))
            else:
                visit(path, sub_key)

    st = os.stat(root)
    visit(root, (st.st_dev, st.st_ino))
    return found


def scan_images(root: str | os.PathLike, check: bool = True, decode: bool = False,
                labelled: bool | None = None) -> ImageScan:
    """List the images under ``root`` with their labels, recording what was skipped and why.

    Args:
        root: a folder with one sub-folder per class, or a plain folder of images.
        check: open each file's header and skip those that are not readable images.
        decode: also decode every image (slower; catches truncated files whose header is
            intact, which the header check lets through) and report the near-constant ones
            (``ImageScan.near_constant``: kept, but e.g. blank after compositing on white).
        labelled: None reads the layout from the folder (see the module docstring); True
            requires class sub-folders; False lists every image below ``root`` without labels.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a folder.
        ValueError: no usable image was found, or ``labelled=True`` and no class sub-folder
            holds an image.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"Image folder {str(root)!r} does not exist. Pass a folder of images, or one with "
                                "one sub-folder per class.")
    if not root.is_dir():
        raise FileNotFoundError(f"{str(root)!r} is a file, not a folder. Pass a folder of images, or one with "
                                "one sub-folder per class.")
    if labelled not in (None, True, False):
        raise ValueError(f"The 'labelled' parameter must be None, True or False. Got {labelled!r} instead.")
    skipped: list[tuple[Path, str]] = []
    candidates = _walk(root, skipped)
    at_top = [len(p.relative_to(root).parts) == 1 for p in candidates]
    if labelled is None:
        labelled = not all(at_top) if candidates else True
    if labelled is True and candidates and all(at_top):
        raise ValueError(f"{str(root)!r} has no class sub-folder with images. Lay a labelled folder out as "
                         f"{root}/<class name>/<image>, one sub-folder per class, or pass labelled=False.")
    paths, labels, near_constant = [], [], []
    for path, top in zip(candidates, at_top):
        if labelled and top:
            skipped.append((path, "lies directly in the root folder beside the class sub-folders; move it into a "
                                  "sub-folder named after its class, or list with labelled=False"))
            continue
        reason = _check_header(path, decode) if (check or decode) else None
        if reason:
            skipped.append((path, reason))
            continue
        if decode and is_near_constant(load_image(path)):
            near_constant.append(path)
        paths.append(path)
        labels.append(path.relative_to(root).parts[0])
    other = [p for p, reason in skipped if reason.startswith("extension not in")]
    if other:  # manifests, notes, sidecar files: listed in .skipped, summed up in one line
        logger.info("ignored %d file(s) without an image extension (e.g. %s)", len(other), other[0].name)
    for path, reason in skipped:
        if not reason.startswith("extension not in"):
            logger.warning("skipped %s: %s", path, reason)
    for path in near_constant:
        logger.warning("kept %s, but it is near-constant (shows next to nothing after compositing on white)", path)
    if not paths:
        raise ValueError(
            f"No usable image found under {str(root)!r} ({len(skipped)} file(s) skipped). Expected images "
            f"({'|'.join(IMAGE_EXTENSIONS)}) in {root} or in {root}/<class name>/."
        )
    if labelled:
        logger.info("found %d images in %d classes under %s (%d skipped)", len(paths), len(set(labels)), root,
                    len(skipped))
    else:
        logger.info("found %d images (no labels) under %s (%d skipped)", len(paths), root, len(skipped))
    return ImageScan(paths, labels if labelled else None, skipped, near_constant)


def list_images(root: str | os.PathLike, labelled: bool | None = None) -> tuple[list[Path], list[str] | None]:
    """Images under ``root`` and their labels (the first sub-folder's name), or None for a
    plain folder of images (see the module docstring for the layouts and ``labelled``).

    Unreadable, non-image and non-regular files are skipped and reported through
    ``logging`` with their path and the reason; :func:`scan_images` also returns that list.
    """
    scan = scan_images(root, labelled=labelled)
    return scan.paths, scan.labels


def to_rgb(im: Image.Image) -> Image.Image:
    """An open image as a person sees it, in RGB: EXIF rotation applied, transparency (RGBA,
    LA, P with a transparent colour) composited on white, 16-bit and float pixels scaled.
    Returns a new image; ``im`` is left as it was."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("P", "PA") and ("transparency" in im.info or im.mode == "PA"):
        im = im.convert("RGBA")
    elif im.mode == "LA":
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.nan_to_num(np.asarray(im, dtype=np.float32))
        if im.mode == "F":  # float pixels: [0, 1] or [0, 255]
            peak = 1.0 if arr.max() <= 1.0 else 255.0
        else:
            peak = 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray((arr / peak * 255).clip(0, 255).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def _reduce_for(im: Image.Image, min_size: int) -> Image.Image:
    """Decode big photos at a reduced scale: JPEG through Pillow's draft mode (the decoder's
    DCT scaling by 1/2, 1/4 or 1/8: a 12 MP photo decodes in a fraction of the time), other
    formats by an integer box reduction, always keeping the shorter side >= ``min_size`` so
    the model's own resize still does the final, antialiased step."""
    w, h = im.size
    short = min(w, h)
    if short < 2 * min_size:
        return im
    if im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK", "YCbCr"):
        scale = min_size / short
        im.draft(im.mode, (max(1, int(np.ceil(w * scale))), max(1, int(np.ceil(h * scale)))))
        return im
    factor = short // min_size
    if factor >= 2 and im.mode in ("RGB", "RGBA", "L", "LA"):
        return im.reduce(factor)
    return im


def load_image(path: str | os.PathLike, min_size: int | None = None) -> Image.Image:
    """Open an image as a person sees it: EXIF rotation applied, transparency on white, RGB.

    Only regular files are opened; GIF and multi-page TIFF give their first frame.

    Args:
        min_size: when given, the shorter side the caller needs (e.g. the model's resize):
            images at least twice as large are decoded at a reduced scale that keeps the
            shorter side >= ``min_size`` (JPEG draft mode; features agree with a full decode
            to a mean cosine >= 0.99, BENCHMARKS.md), which is what makes big photos fast.
    """
    missing = _missing_codec(Path(path))
    if missing:
        raise ValueError(f"Cannot read {str(path)!r}: {missing}.")
    with _open_regular(path) as f, Image.open(f) as im:
        if min_size is not None:
            im = _reduce_for(im, int(min_size))
        return to_rgb(im)


def is_near_constant(image: Image.Image, tolerance: float = NEAR_CONSTANT_STD) -> bool:
    """True when ``image`` (as :func:`load_image` gives it) shows next to nothing: the
    standard deviation of its grey levels, on a copy reduced to at most 64 px, is below
    ``tolerance``. A transparent PNG that composites to blank white is the usual case."""
    small = image.convert("RGB")
    small.thumbnail((64, 64), Image.Resampling.BOX)
    return float(np.asarray(small, dtype=np.float32).std()) < tolerance


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


def decodable(paths, labels=None):
    """Keep the images that decode fully; log and return the others.

    Returns:
        ``(paths, labels, skipped)``: the usable paths (and their labels, None when not
        given) and ``[(path, reason)]`` for each file left out.
    """
    kept, kept_labels, skipped = [], [], []
    labels = list(labels) if labels is not None else None
    for i, p in enumerate(paths):
        reason = _check_header(Path(p), decode=True)
        if reason:
            logger.warning("skipped %s: %s", p, reason)
            skipped.append((Path(p), reason))
            continue
        kept.append(p)
        if labels is not None:
            kept_labels.append(labels[i])
    return kept, (kept_labels if labels is not None else None), skipped
