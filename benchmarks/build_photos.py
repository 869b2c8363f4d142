"""Collect real photos from Debian's wallpaper packages (for the near-duplicate and big-photo benchmarks).

    .venv/bin/python benchmarks/build_photos.py [--out DIR] [--packages gnome-backgrounds ...] [--min-side 600]

Each package is fetched with ``apt-get download`` (no root needed: it only downloads the .deb
into a temporary folder) and unpacked with ``dpkg-deb -x``; nothing is installed. Raster images
(JPEG, PNG, WebP) whose shorter side is at least ``--min-side`` pixels are copied byte for byte
into DIR (default: the utils_cv cache, ``bench/photos``; nothing is written into the repository)
as ``<package>__<path under /usr/share with / replaced by _>``. SVGs, icons, screenshots,
other small images, symbolic links, byte-identical copies and transparent overlays are skipped. DIR/MANIFEST.csv lists every copied file: file, package,
version, original path, sha256, width, height and ``family``.

``family`` names the picture a file shows: wallpaper packages ship the same picture several
times (one per resolution, a dark and a light variant, a colour variant), and a benchmark that
treats those as different photos would count true duplicates as errors. The family is the
plasma wallpaper folder, or the file name without its resolution and ``-d``/``-l`` suffixes,
or one of the explicit variant sets in :data:`VARIANT_FAMILIES`.

The default packages are the photo-like ones of Debian 12 (about 85 distinct pictures in about 110
files, 0.1 to 16 MB, up to 5640 x 3172): GNOME's, MATE's, UKUI's, Plasma's and Lomiri's wallpapers.
``desktop-base`` (boot-screen artwork, logos) and ``sway-backgrounds`` (one logo at eight
sizes) are left out on purpose.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

PACKAGES = ("gnome-backgrounds", "mate-backgrounds", "ukui-wallpapers", "plasma-workspace-wallpapers",
            "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04")
EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}
# pictures shipped as several files that differ only in colour or tone: one family each
VARIANT_FAMILIES = {
    r"^Ubuntu-Mate-.*-no-logo$": "Ubuntu-Mate-no-logo",
    r"^MATE-Stripes-.*$": "MATE-Stripes",
}
FIELDS = ["file", "package", "version", "original_path", "sha256", "width", "height", "family"]


def _run(cmd: list[str], cwd: Path) -> str:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    return res.stdout


def family_of(package: str, original: str) -> str:
    """The picture a file shows (see the module doc)."""
    parts = Path(original).parts
    if "wallpapers" in parts and "contents" in parts:  # plasma: /usr/share/wallpapers/<Name>/contents/...
        return f"{package}:{parts[parts.index('contents') - 1]}"
    stem = Path(original).stem
    for pattern, family in VARIANT_FAMILIES.items():
        if re.match(pattern, stem):
            return f"{package}:{family}"
    stem = re.sub(r"[_-]\d{3,5}x\d{3,5}(_Portrait)?$", "", stem)
    stem = re.sub(r"-[dl]$", "", stem)
    return f"{package}:{stem}"


def _size(path: Path) -> tuple[int, int] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.size
    except Exception:  # noqa: BLE001 - not an image Pillow reads: skipped
        return None


def _transparent(path: Path) -> bool:
    """True for an overlay: more than 1 % of its pixels see-through (MATE's abstract wallpapers are
    shapes on a transparent sheet meant to lie over a colour; on white several become blank)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            if "A" not in im.getbands() and "transparency" not in im.info:
                return False
            im.draft("RGB", (512, 512))
            im = im.convert("RGBA")
            im.thumbnail((512, 512))
            return float(np.mean(np.asarray(im)[..., 3] < 250)) > 0.01


def build(out: Path, packages: list[str], min_side: int = 600) -> list[dict]:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise SystemExit("apt-get and dpkg-deb are needed (a Debian or Ubuntu system).")
    out.mkdir(parents=True, exist_ok=True)
    rows, seen = [], set()
    with tempfile.TemporaryDirectory(prefix="utils_cv_photos.") as tmp:
        tmp = Path(tmp)
        for package in packages:
            _run(["apt-get", "download", package], tmp)
            debs = sorted(tmp.glob(f"{package}_*.deb"))
            if not debs:
                raise SystemExit(f"apt-get download {package} produced no .deb")
            version = _run(["dpkg-deb", "-f", str(debs[-1]), "Version"], tmp).strip()
            root = tmp / f"x_{package}"
            _run(["dpkg-deb", "-x", str(debs[-1]), str(root)], tmp)
            kept = skipped = 0
            for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS):
                original = "/" + str(path.relative_to(root))
                size = _size(path)
                if path.is_symlink() or size is None or min(size) < min_side or "screenshot" in path.name.lower() \
                        or "/icons/" in original or "/doc/" in original or _transparent(path):
                    skipped += 1
                    continue
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                if digest in seen:  # the same bytes under another name
                    skipped += 1
                    continue
                seen.add(digest)
                rel = original.removeprefix("/usr/share/").replace("/", "_")
                name = f"{package}__{rel}"
                shutil.copyfile(path, out / name)
                rows.append({"file": name, "package": package, "version": version, "original_path": original,
                             "sha256": digest, "width": size[0],
                             "height": size[1], "family": family_of(package, original)})
                kept += 1
            print(f"{package} {version}: {kept} photos, {skipped} skipped (link, copy, SVG, small, screenshot, icon, transparent overlay)",
                  file=sys.stderr)
    with open(out / "MANIFEST.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="destination (default: cache bench/photos)")
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES))
    parser.add_argument("--min-side", type=int, default=600, help="skip images whose shorter side is smaller")
    args = parser.parse_args(argv)
    if args.out is None:
        from utils_cv.common.paths import cache_dir

        args.out = cache_dir("bench", "photos")
    rows = build(args.out, args.packages, args.min_side)
    mb = sum((args.out / r["file"]).stat().st_size for r in rows) / 1e6
    print(f"{len(rows)} photos ({len({r['family'] for r in rows})} distinct pictures, {mb:.0f} MB) in {args.out}")


if __name__ == "__main__":
    main()
