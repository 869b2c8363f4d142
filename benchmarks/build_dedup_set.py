"""Build the near-duplicate benchmark: real photos, edited copies of each, and many distractors.

    .venv/bin/python benchmarks/build_photos.py              # the wallpaper photos, once
    .venv/bin/python benchmarks/build_dedup_set.py [--photos DIR] [--out DIR] [--seed 0]

Inputs: the photos of ``build_photos.py`` (one per picture: the largest file of each ``family``
of its MANIFEST.csv, so two resolutions of one wallpaper never count as different photos) and
the repository's default data set (13 classes of small photos and drawings). Every input is
first reduced to at most 1024 px on its long side and composited onto white.

Roles, drawn with ``--seed``:

* **sources**: ``--photo-sources`` of the wallpaper photos (a share) and ``--dataset-sources``
  images of each default-data-set class. Each source is written once and gets one edited copy
  per kind in :data:`EDITS`: ``resize`` (25-75 %), ``jpeg`` (quality 20-90), ``crop`` (70-95 %
  of each side), ``flip`` (horizontal), ``rotate`` (2-10 degrees, either way, black corners),
  ``brightness_contrast`` (each factor 0.7-1.3), ``grayscale``, ``border`` (a plain frame or
  black letterbox bars), ``text`` (a small caption in a corner) and ``exact`` (a byte copy).
* **distractors**: the other wallpaper photos and the other default-data-set images, each
  written once, so every class of the data set has images that look alike but are not copies.

Every file gets a shuffled numeric name (``images/00042.jpg``): nothing in a name tells which
files belong together. Ground truth: ``groups.json`` (each source file -> its copies with the edit
kind and its parameters; the distractors) and ``files.csv`` (one row per file: its origin, role,
edit, class). A pair of files is a true duplicate when both come from the same source. Images of
the default data set with the same pixels are kept once, and the few that are an edited copy of
another one there (:data:`DATASET_VARIANTS`) are left out. Output (default: the utils_cv cache,
``bench/dedup``; nothing is written into the repository) is replaced as a whole, except the
benchmark's ``cache_*`` files, which are keyed on file contents.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

EDITS = ("resize", "jpeg", "crop", "flip", "rotate", "brightness_contrast", "grayscale", "border", "text", "exact")
MAX_SIDE = 1024
QUALITY = 92  # JPEG quality of every written file except the ``jpeg`` edit's own
# images of the default data set that are an edited copy of another one there (same photo
# re-cropped or re-toned, same drawing with another lamp lit): in a near-duplicate benchmark
# they would be true duplicates counted as errors, so they are left out (seen by eye among the
# closest pairs of distinct images)
DATASET_VARIANTS = {
    "monuments/gc_colosseum_2.jpg": "the same photo as monuments/gc_colosseum.jpg",
    "monuments/gc_greatPyramid.jpg": "the same photo as monuments/gc_greatPyramidOfGiza.jpg",
    "monuments/gc_brandenburgGate_2.jpg": "the same photo as monuments/gc_brandenburgGate.jpg",
    "traffic_signs/tux_stoplight_02_yellow.jpg": "the drawing of traffic_signs/tux_stoplight_01_red.jpg",
    "traffic_signs/tux_stoplight_03_green.jpg": "the drawing of traffic_signs/tux_stoplight_01_red.jpg",
    "hand_signs/tux_asl_zzz_0.jpg": "the drawing of hand_signs/tux_asl_o.jpg",
}
CAPTIONS = ("IMG_{n:04d}.JPG", "(c) {year} photo club", "holiday {year}", "DSC{n:05d}", "#{n} best of {year}",
            "shared via chat", "{year}-0{m}-1{d} 1{d}:3{m}")


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at a reduced scale when it is large
        im = im.convert("RGBA")
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    im = Image.alpha_composite(white, im).convert("RGB")
    im.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return im


def _caption(rng: np.random.Generator) -> str:
    text = CAPTIONS[rng.integers(len(CAPTIONS))]
    return text.format(n=int(rng.integers(1, 99999)), year=int(rng.integers(2005, 2025)),
                       m=int(rng.integers(1, 9)), d=int(rng.integers(0, 9)))


def edit(im: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, dict, int]:
    """One edited copy of ``im``: (image, parameters, JPEG quality to save it with)."""
    w, h = im.size
    if kind == "resize":
        s = float(rng.uniform(0.25, 0.75))
        size = (max(1, round(w * s)), max(1, round(h * s)))
        return im.resize(size, Image.Resampling.LANCZOS), {"scale": round(s, 3), "size": list(size)}, QUALITY
    if kind == "jpeg":
        q = int(rng.integers(20, 91))
        return im, {"quality": q}, q
    if kind == "crop":
        f = float(rng.uniform(0.70, 0.95))
        cw, ch = max(1, round(w * f)), max(1, round(h * f))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        box = (x0, y0, x0 + cw, y0 + ch)
        return im.crop(box), {"side": round(f, 3), "box": list(box)}, QUALITY
    if kind == "flip":
        return ImageOps.mirror(im), {}, QUALITY
    if kind == "rotate":
        a = float(rng.uniform(2.0, 10.0) * rng.choice([-1.0, 1.0]))
        return im.rotate(a, Image.Resampling.BICUBIC, expand=False, fillcolor=(0, 0, 0)), {"degrees": round(a, 2)}, QUALITY
    if kind == "brightness_contrast":
        b, c = float(rng.uniform(0.7, 1.3)), float(rng.uniform(0.7, 1.3))
        out = ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(b)).enhance(c)
        return out, {"brightness": round(b, 3), "contrast": round(c, 3)}, QUALITY
    if kind == "grayscale":
        return ImageOps.grayscale(im), {}, QUALITY
    if kind == "border":
        if rng.random() < 0.5:  # letterbox: black bars on the long sides
            f = float(rng.uniform(0.08, 0.15))
            pad = (0, round(h * f)) if w >= h else (round(w * f), 0)
            out = ImageOps.expand(im, border=(pad[0], pad[1], pad[0], pad[1]), fill=(0, 0, 0))
            return out, {"style": "letterbox", "bar": round(f, 3)}, QUALITY
        f = float(rng.uniform(0.03, 0.10))
        colour = [(255, 255, 255), (0, 0, 0), (128, 128, 128), tuple(int(v) for v in rng.integers(0, 256, 3))][
            int(rng.integers(4))]
        out = ImageOps.expand(im, border=max(1, round(min(w, h) * f)), fill=colour)
        return out, {"style": "frame", "width": round(f, 3), "colour": list(colour)}, QUALITY
    if kind == "text":
        out = im.copy()
        text = _caption(rng)
        size = max(8, round(h * float(rng.uniform(0.04, 0.07))))
        font = ImageFont.load_default(size=size)
        draw = ImageDraw.Draw(out)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=max(1, size // 12))
        tw, th = right - left, bottom - top
        margin = max(2, size // 2)
        corner = int(rng.integers(4))
        x = margin if corner % 2 == 0 else max(0, w - tw - margin)
        y = margin if corner < 2 else max(0, h - th - margin)
        draw.text((x - left, y - top), text, font=font, fill=(255, 255, 255), stroke_width=max(1, size // 12),
                  stroke_fill=(0, 0, 0))
        return out, {"text": text, "size": size, "corner": ["top-left", "top-right", "bottom-left", "bottom-right"][corner]}, QUALITY
    raise ValueError(f"unknown edit {kind!r}; expected one of {EDITS}")


def _photos(photos: Path) -> list[tuple[str, Path]]:
    """(family, file) of the largest file of each family in the photo folder's manifest."""
    manifest = photos / "MANIFEST.csv"
    if not manifest.is_file():
        raise SystemExit(f"{manifest} not found: run benchmarks/build_photos.py first")
    best: dict[str, tuple[int, Path]] = {}
    with open(manifest, newline="") as f:
        for row in csv.DictReader(f):
            pixels = int(row["width"]) * int(row["height"])
            if row["family"] not in best or pixels > best[row["family"]][0]:
                best[row["family"]] = (pixels, photos / row["file"])
    return sorted((fam, p) for fam, (_, p) in best.items())


def _dataset() -> list[tuple[str, Path]]:
    """(class, file) of the default data set, exact pixel duplicates kept once, variants left out."""
    from utils_cv.similarity import data

    paths, labels = data.list_images(data.default_dataset())
    seen, out = set(), []
    for p, label in zip(paths, labels):
        if f"{label}/{Path(p).name}" in DATASET_VARIANTS:
            continue
        with Image.open(p) as im:
            digest = hashlib.sha256(im.convert("RGB").tobytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            out.append((label, Path(p)))
    return out


def build(out: Path, photos: Path, seed: int = 0, photo_sources: float = 0.75, dataset_sources: int = 6) -> dict:
    rng = np.random.default_rng(seed)
    photo_list = _photos(photos)
    dataset = _dataset()
    n_photo_src = round(len(photo_list) * photo_sources)
    photo_order = rng.permutation(len(photo_list))
    items = []  # (kind, origin name, class or None, path, is_source)
    for rank, i in enumerate(photo_order):
        fam, p = photo_list[i]
        items.append(("photo", fam, None, p, rank < n_photo_src))
    by_class: dict[str, list[int]] = {}
    for i, (label, _) in enumerate(dataset):
        by_class.setdefault(label, []).append(i)
    dataset_src = {i for members in by_class.values()
                   for i in rng.choice(members, size=min(dataset_sources, len(members)), replace=False).tolist()}
    for i, (label, p) in enumerate(dataset):
        items.append(("dataset", f"{label}/{p.name}", label, p, i in dataset_src))
    n_files = sum(1 + len(EDITS) * it[4] for it in items)
    names = iter(f"{k:05d}.jpg" for k in rng.permutation(n_files))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    (tmp / "images").mkdir()
    rows, groups, distractors = [], {}, []
    try:
        for kind, origin, label, path, is_source in items:
            im = _open(path)
            name = next(names)
            im.save(tmp / "images" / name, quality=QUALITY)
            role = "source" if is_source else "distractor"
            rows.append({"file": name, "origin": origin, "kind": kind, "class": label or "", "role": role,
                         "source": name if is_source else "", "edit": "", "params": ""})
            if not is_source:
                distractors.append(name)
                continue
            copies = []
            # keyed on the origin, so a source keeps its edits when the set around it changes
            item_rng = np.random.default_rng([seed, zlib.crc32(origin.encode())])
            for e in EDITS:
                copy_name = next(names)
                if e == "exact":
                    shutil.copyfile(tmp / "images" / name, tmp / "images" / copy_name)
                    params = {}
                else:
                    edited, params, quality = edit(im, e, item_rng)
                    edited.save(tmp / "images" / copy_name, quality=quality)
                copies.append({"file": copy_name, "edit": e, "params": params})
                rows.append({"file": copy_name, "origin": origin, "kind": kind, "class": label or "", "role": "copy",
                             "source": name, "edit": e, "params": json.dumps(params)})
            groups[name] = copies
        info = {"seed": seed, "edits": list(EDITS), "max_side": MAX_SIDE, "photos": str(photos),
                "counts": {"files": len(rows), "sources": len(groups), "distractors": len(distractors),
                           "photo_sources": n_photo_src, "dataset_sources": len(dataset_src),
                           "true_pairs": len(groups) * (len(EDITS) + 1) * len(EDITS) // 2},
                "groups": groups, "distractors": sorted(distractors)}
        (tmp / "groups.json").write_text(json.dumps(info, indent=1))
        with open(tmp / "files.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(sorted(rows, key=lambda r: r["file"]))
        if out.exists():
            for cached in out.glob("cache_*"):  # benchmark caches keyed on file contents stay valid
                shutil.move(str(cached), tmp / cached.name)
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return info


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, default=None, help="output of build_photos.py (default: cache bench/photos)")
    parser.add_argument("--out", type=Path, default=None, help="benchmark folder (default: cache bench/dedup)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--photo-sources", type=float, default=0.75,
                        help="share of the wallpaper photos that get copies (the others are distractors)")
    parser.add_argument("--dataset-sources", type=int, default=6, help="sources per class of the default data set")
    args = parser.parse_args(argv)
    from utils_cv.common.paths import cache_dir

    photos = args.photos or cache_dir("bench", "photos")
    out = args.out or cache_dir("bench") / "dedup"
    info = build(out, photos, args.seed, args.photo_sources, args.dataset_sources)
    print(json.dumps(info["counts"]), "->", out)


if __name__ == "__main__":
    main()
