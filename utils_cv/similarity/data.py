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
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_PIL_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "BMP"}

__all__ = [
    "IMAGE_EXTENSIONS",
    "ComparativeSet",
    "ImageScan",
    "decodable",
    "comparative_sets",
    "default_dataset",
    "list_images",
    "load_image",
    "scan_images",
    "split_by_class",
    "split_by_image",
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


def _check_header(path: Path, decode: bool = False) -> str | None:
    """None when ``path`` opens as a supported image, else the reason it does not.

    ``decode``: also decode the pixels (catches truncated files whose header is intact)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                fmt = im.format
                w, h = im.size
                if decode and fmt in _PIL_FORMATS:
                    im.load()
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


def scan_images(root: str | os.PathLike, check: bool = True, decode: bool = False) -> ImageScan:
    """List the images under ``root`` with their labels, recording what was skipped and why.

    Args:
        root: folder with one sub-folder per class.
        check: open each file's header and skip those that are not readable images.
        decode: also decode every image (slower; catches truncated files whose header is
            intact, which the header check lets through).

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
            reason = _check_header(path, decode) if (check or decode) else None
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


# ---------------------------------------------------------------------------- splits
def _label_array(labels, name: str = "labels") -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or len(arr) == 0:
        raise ValueError(f"The {name!r} parameter must be a non-empty sequence of labels. Got shape {arr.shape}.")
    return arr


def split_by_image(paths, labels, test_size: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of images: each class keeps about ``test_size`` of its images for test.

    Every class with at least 2 images has at least one image on each side. Returns sorted
    int64 index arrays ``(train_idx, test_idx)``; the same seed gives the same split.
    """
    y = _label_array(labels)
    if len(paths) != len(y):
        raise ValueError(f"'paths' has {len(paths)} items but 'labels' has {len(y)}: they must be aligned.")
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"The 'test_size' parameter must be in (0, 1). Got {test_size!r} instead.")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.nonzero(y == c)[0])
        n_test = int(round(test_size * len(idx)))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test += idx[:n_test].tolist()
        train += idx[n_test:].tolist()
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(test), dtype=np.int64)


def split_by_class(paths, labels, test_classes: float | int | Sequence = 0.5, seed: int = 0,
                   by_name: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Split by class (the metric-learning protocol): train and test share no class.

    Args:
        test_classes: share of classes for test (float in (0, 1)), their number (int), or
            the test class names themselves.
        seed: picks the test classes at random (when given as a share or a number).
        by_name: instead of a random pick, the last classes in name order are the test
            classes: the convention of CUB-200-2011, Cars-196 and Stanford Online Products,
            whose folders are numbered by class id (the first 100 of CUB's 200 train).

    Returns:
        Sorted int64 index arrays ``(train_idx, test_idx)``.
    """
    y = _label_array(labels)
    if len(paths) != len(y):
        raise ValueError(f"'paths' has {len(paths)} items but 'labels' has {len(y)}: they must be aligned.")
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError("split_by_class needs at least 2 classes.")
    if isinstance(test_classes, (list, tuple, set, np.ndarray)):
        chosen = set(test_classes)
        unknown = chosen - set(classes.tolist())
        if unknown:
            raise ValueError(f"The 'test_classes' parameter names unknown classes {sorted(unknown)}.")
    else:
        if isinstance(test_classes, float):
            if not 0.0 < test_classes < 1.0:
                raise ValueError(f"The 'test_classes' parameter as a share must be in (0, 1). Got {test_classes!r}.")
            n = int(round(test_classes * len(classes)))
        else:
            n = int(test_classes)
        n = min(max(n, 1), len(classes) - 1)
        order = np.sort(classes)[::-1] if by_name else np.random.default_rng(seed).permutation(classes)
        chosen = set(order[:n].tolist())
    is_test = np.isin(y, list(chosen))
    if is_test.all() or not is_test.any():
        raise ValueError("split_by_class would leave train or test empty; choose fewer test classes.")
    return np.nonzero(~is_test)[0].astype(np.int64), np.nonzero(is_test)[0].astype(np.int64)


@dataclass(frozen=True)
class ComparativeSet:
    """One query image, one positive (same class) and N negatives (other classes), as indices."""

    query: int
    positive: int
    negatives: np.ndarray


def comparative_sets(labels, num_negatives: int = 99, seed: int = 0) -> list[ComparativeSet]:
    """One comparative set per image: the image as query, a random other image of its class as
    positive, ``num_negatives`` images of other classes drawn without replacement.

    Raises:
        ValueError: a class has a single image (no positive) or fewer than
            ``num_negatives`` images lie outside some class.
    """
    y = _label_array(labels)
    if not isinstance(num_negatives, (int, np.integer)) or num_negatives < 1:
        raise ValueError(f"The 'num_negatives' parameter must be a positive integer. Got {num_negatives!r} instead.")
    classes, counts = np.unique(y, return_counts=True)
    single = classes[counts < 2]
    if len(single):
        raise ValueError(
            f"Classes {single.tolist()[:5]} have a single image, so their queries have no positive; "
            "add images or leave those classes out."
        )
    short = [c for c, n in zip(classes, counts) if len(y) - n < num_negatives]
    if short:
        raise ValueError(
            f"Only {len(y) - counts[classes.tolist().index(short[0])]} images lie outside class {short[0]!r}, "
            f"fewer than num_negatives={num_negatives}; lower 'num_negatives'."
        )
    rng = np.random.default_rng(seed)
    by_class = {c: np.nonzero(y == c)[0] for c in classes}
    others = {c: np.nonzero(y != c)[0] for c in classes}
    sets = []
    for i, c in enumerate(y):
        same = by_class[c]
        positive = int(rng.choice(same[same != i]))
        negatives = rng.choice(others[c], size=num_negatives, replace=False)
        sets.append(ComparativeSet(i, positive, negatives.astype(np.int64)))
    return sets


def decodable(paths: Sequence, labels: Sequence | None = None):
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
