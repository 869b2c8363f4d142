"""Build the disjoint-class benchmark from the Debian package ``openclipart-png``.

    sudo apt-get install -y --no-install-recommends openclipart-png
    .venv/bin/python benchmarks/build_openclipart.py [--out DIR] [--min-images 30]

Classes are the leaf folders (folders without sub-folders) of /usr/share/openclipart/png
with at least ``--min-images`` images. Each image is composited onto white, reduced to at most 256 px and stored as JPEG
under DIR/<class>/ (default: the utils_cv cache, ``datasets/openclipart``; nothing is written
into the repository). Dropped, and counted in DIR/MANIFEST.json: images that are blank after
compositing (most of ``special/gradients``), images too large to decode safely (Pillow's
decompression-bomb limit), and every copy of an image whose pixels appear in two classes
(e.g. ``map_symbols`` and ``aiga-symbols``). The class list is sorted by name: the first half
trains, the second half evaluates (``classes_train`` / ``classes_test`` in the manifest).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from utils_cv.common.paths import atomic_write, cache_dir

SOURCE = Path("/usr/share/openclipart/png")


def _prepare(path: Path) -> Image.Image | str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                im = im.convert("RGBA")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "too large to decode safely"
    except Exception as exc:  # noqa: BLE001
        return f"unreadable ({type(exc).__name__})"
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    im = Image.alpha_composite(white, im).convert("RGB")
    im.thumbnail((256, 256), Image.Resampling.LANCZOS)
    arr = np.asarray(im)
    if arr.std() < 2.0 or (arr > 250).mean() > 0.995:
        return "blank after compositing on white"
    return im


def build(out: Path, min_images: int = 30) -> dict:
    if not SOURCE.is_dir():
        raise SystemExit(f"{SOURCE} not found: sudo apt-get install -y --no-install-recommends openclipart-png")
    leaves = defaultdict(list)
    for p in sorted(SOURCE.rglob("*.png")):
        leaves[str(p.parent.relative_to(SOURCE))].append(p)
    parents = {str(Path(k).parent) for k in leaves} | {str(p) for k in leaves for p in Path(k).parents}
    leaves = {k: v for k, v in leaves.items() if len(v) >= min_images and k not in parents}
    dropped = defaultdict(int)
    kept: dict[str, list[tuple[str, Image.Image, str]]] = {}
    owners = defaultdict(set)
    for folder, files in leaves.items():
        label = folder.replace("/", "__")
        kept[label] = []
        for p in files:
            im = _prepare(p)
            if isinstance(im, str):
                dropped[im] += 1
                continue
            digest = hashlib.sha256(im.tobytes()).hexdigest()
            owners[digest].add(label)
            kept[label].append((p.stem, im, digest))
    shared = {d for d, labels in owners.items() if len(labels) > 1}
    classes = {}
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".openclipart."))
    for label, items in kept.items():
        seen, good = set(), []
        for stem, im, digest in items:
            if digest in shared:
                dropped["identical image in two classes"] += 1
            elif digest in seen:
                dropped["duplicate within its class"] += 1
            else:
                seen.add(digest)
                good.append((stem, im))
        if len(good) < min_images:
            dropped[f"class left with fewer than {min_images} images"] += len(good)
            continue
        (tmp / label).mkdir(parents=True)
        for i, (stem, im) in enumerate(good):
            im.save(tmp / label / f"{i:04d}_{stem[:60]}.jpg", quality=90)
        classes[label] = len(good)
    names = sorted(classes)
    half = len(names) // 2
    manifest = {"source": str(SOURCE), "min_images": min_images, "classes": classes,
                "classes_train": names[:half], "classes_test": names[half:], "dropped": dict(dropped),
                "images": sum(classes.values())}
    with atomic_write(tmp / "MANIFEST.json", "w") as f:
        json.dump(manifest, f, indent=1)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return manifest


def default_location() -> Path:
    return cache_dir("datasets") / "openclipart"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--min-images", type=int, default=30)
    args = parser.parse_args()
    out = (args.out or default_location()).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    m = build(out, args.min_images)
    print(f"{m['images']} images in {len(m['classes'])} classes at {out} "
          f"({len(m['classes_train'])} train / {len(m['classes_test'])} test classes); dropped: {m['dropped']}")


if __name__ == "__main__":
    main()
