"""Build the default image-similarity data set in ``data/similarity`` from two Debian packages.

    sudo apt-get install -y --no-install-recommends tuxpaint-stamps-default gcompris-qt-data
    python data/tools/build_default_dataset.py            # writes data/similarity + data/MANIFEST.csv

Every image is a real photo (the ``cartoon_buildings`` class excepted) shipped by Debian:

* ``tuxpaint-stamps-default``: photo stamps cut out on a transparent background; composited
  onto white, cropped to the object, longest side at most 256 px.
* ``gcompris-qt-data``: Wikimedia photos stored as WebP inside Qt resource files (.rcc),
  read with :mod:`rcc` beside this script.

Classes are chosen to be visually coherent (a person would agree two images of a class look
alike). Mirrored copies (``*_mirror``) and exact pixel duplicates are dropped. The result is
written to a temporary folder first and swapped in at the end, so an interrupted build never
leaves a half-written data set. Licences come from each package's machine-readable
``debian/copyright`` (the last matching ``Files:`` stanza wins, as DEP-5 says).
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import gzip
import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rcc import RccFile  # noqa: E402

TUX = Path("/usr/share/tuxpaint/stamps")
GC_RCC = Path("/usr/share/gcompris-qt/rcc")
TUX_PKG = "tuxpaint-stamps-default"
GC_PKG = "gcompris-qt-data"
MAX_SIDE = 256
JPEG_QUALITY = 88

GC_CAT = "gcompris/src/activities/categorization/resource/images"
GC_FARM = "gcompris/src/activities/explore_farm_animals/resource/animals"
GC_WORLD = "gcompris/src/activities/explore_world_animals/resource/animals"
GC_MON = "gcompris/src/activities/explore_monuments/resource"
GC_ERASE = "gcompris/src/activities/erase/resource"


def _names(folder: str, names: str, ext: str = "webp") -> list[str]:
    return [f"{folder}/{n}.{ext}" for n in names.split()]


# class -> list of (package, rcc file or None, glob or list of paths)
CLASSES: dict[str, list[tuple[str, str | None, object]]] = {
    "birds": [
        (TUX_PKG, None, "animals/birds/*.png"),
        (GC_PKG, "explore_farm_animals.rcc", _names(GC_FARM, "chicken duck owl")),
        (GC_PKG, "explore_world_animals.rcc", _names(GC_WORLD, "scarlet_macaw")),
        (GC_PKG, "erase.rcc", _names(GC_ERASE, "gosling heron kingfisher northern_harrier penguin spoonbills "
                                               "swans toucan")),
    ],
    "livestock": [
        (TUX_PKG, None, "animals/mammals/bovines/*.png"),
        (TUX_PKG, None, [f"animals/mammals/{n}.png" for n in "pig pig_golden pig_golden2 wildboar".split()]),
        (GC_PKG, "explore_farm_animals.rcc", _names(GC_FARM, "cow horse pig sheep")),
        (GC_PKG, "explore_world_animals.rcc", _names(GC_WORLD, "bison")),
        (GC_PKG, "erase.rcc", _names(GC_ERASE, "alpaca calf camels goat horse nubian_ibex")),
    ],
    "mammals": [
        (TUX_PKG, None, [f"animals/mammals/{n}.png" for n in
                         "badger echidna elephant ferret giraffe hedgehog hippopotamus rabbit_little rhino_black".split()]),
        (TUX_PKG, None, "animals/mammals/rodents/*.png"),
        (GC_PKG, "explore_farm_animals.rcc", _names(GC_FARM, "cat dog")),
        (GC_PKG, "explore_world_animals.rcc",
         _names(GC_WORLD, "polar_bear lemur panda moose kangaroo hedgehog jaguar koala giraffe")),
        (GC_PKG, "erase.rcc", _names(GC_ERASE, "cheetah flying_fox gibbon giraffe gorilla kitten long_nosed_monkey "
                                               "macaque meerkats pika red_panda rhinoceros squirrel")),
    ],
    "fish": [
        (GC_PKG, "categorization.rcc", f"{GC_CAT}/fishes/*.webp"),
        (TUX_PKG, None, [f"animals/fish/{n}.png" for n in
                         "bluegroper butterflyfish clownfish coraltrout dolphinfish lionfish moonwrasse "
                         "seahorse stripedfish".split()]),
    ],
    "fruit": [
        (TUX_PKG, None, "food/fruit/*.png"),
    ],
    "vegetables": [(TUX_PKG, None, "food/vegetables/*.png")],
    "flowers": [(TUX_PKG, None, "plants/flowers/*.png")],
    "traffic_signs": [(TUX_PKG, None, "town/roadsigns/*.png")],
    "tools": [
        (GC_PKG, "categorization.rcc", f"{GC_CAT}/tools/*.webp"),
        (TUX_PKG, None, [f"household/tools/{n}.png" for n in
                         "hammer mallet_metal measuring_tape paintbrush_large plyers saw spade toolbox "
                         "wrench wrench_adjustable wrench_plumbers".split()]),
    ],
    "monuments": [
        (GC_PKG, "categorization.rcc", f"{GC_CAT}/monuments/*.webp"),
        (GC_PKG, "explore_monuments.rcc", f"{GC_MON}/*/*.webp"),
    ],
    "hand_signs": [(TUX_PKG, None, "symbols/alphabets/asl/*.png")],
    "cartoon_buildings": [(TUX_PKG, None, "town/houses/cartoon/*.png")],
    "renewable_energy": [(GC_PKG, "categorization.rcc", f"{GC_CAT}/renewable/*.webp")],
}
EXCLUDE = ("traffic_cone",)


@dataclass
class Licence:
    stanzas: list[tuple[list[str], str, str]]  # (patterns, licence, copyright)

    @classmethod
    def from_debian(cls, package: str) -> "Licence":
        text = Path(f"/usr/share/doc/{package}/copyright").read_text(encoding="utf-8", errors="replace")
        stanzas = []
        for block in text.split("\n\n"):
            fields, key = {}, None
            for line in block.splitlines():
                if line[:1] in (" ", "\t") and key:
                    fields[key] += "\n" + line.strip()
                elif ":" in line:
                    key, value = line.split(":", 1)
                    fields[key] = value.strip()
            if "Files" in fields and "License" in fields:
                patterns = fields["Files"].split()
                copyright_ = " ".join(fields.get("Copyright", "").split())
                if patterns == ["*"]:  # the package-wide stanza lists every contributor
                    copyright_ = f"{package} contributors (see /usr/share/doc/{package}/copyright)"
                stanzas.append((patterns, fields["License"].split("\n")[0], copyright_))
        return cls(stanzas)

    def lookup(self, path: str) -> tuple[str, str]:
        """Licence and copyright for ``path`` (DEP-5: last match wins; extensions ignored,
        since gcompris lists its sources as .jpg/.png and ships them as .webp)."""
        def without_extension(p: str) -> str:  # globs like "resource/*" stay as they are
            return p if "*" in PurePosixPath(p).name else str(PurePosixPath(p).with_suffix(""))

        stem = without_extension(path)
        found = ("unknown", "")
        for patterns, licence, copyright_ in self.stanzas:
            if any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(stem, without_extension(p)) for p in patterns):
                found = (licence, copyright_)
        return found


def _package_version(package: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"Debian package {package!r} is not installed: "
                         f"sudo apt-get install -y --no-install-recommends {TUX_PKG} {GC_PKG}")
    return out.stdout


def _prepare(raw: bytes) -> Image.Image:
    """Decode, composite transparency onto white, crop to the object, bound the size."""
    im = Image.open(io.BytesIO(raw))
    im.load()
    if im.mode in ("P", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        bbox = im.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
        if bbox:
            im = im.crop(bbox)
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
        pad = max(2, int(0.04 * max(im.size)))
        canvas = Image.new("RGB", (im.width + 2 * pad, im.height + 2 * pad), (255, 255, 255))
        canvas.paste(im.convert("RGB"), (pad, pad))
        im = canvas
    im = im.convert("RGB")
    im.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return im


def _sources(package, rcc_name, selector, rcc_cache):
    if package == TUX_PKG:
        paths = sorted(TUX.glob(selector)) if isinstance(selector, str) else [TUX / p for p in selector]
        for p in paths:
            if not p.is_file():
                raise SystemExit(f"missing {p}: is {TUX_PKG} fully installed?")
            yield f"/usr/share/tuxpaint/stamps/{p.relative_to(TUX)}", f"{p.relative_to(TUX)}", p.read_bytes()
    else:
        if rcc_name not in rcc_cache:
            rcc_cache[rcc_name] = dict(RccFile(GC_RCC / rcc_name).files())
        files = rcc_cache[rcc_name]
        names = sorted(n for n in files if fnmatch.fnmatch(n, selector)) if isinstance(selector, str) else selector
        for n in names:
            if n not in files:
                raise SystemExit(f"{rcc_name} has no {n}")
            yield f"/usr/share/gcompris-qt/rcc/{rcc_name}:/{n}", n.removeprefix("gcompris/"), files[n]


def build(out_root: Path) -> list[dict]:
    versions = {TUX_PKG: _package_version(TUX_PKG), GC_PKG: _package_version(GC_PKG)}
    licences = {TUX_PKG: Licence.from_debian(TUX_PKG), GC_PKG: Licence.from_debian(GC_PKG)}
    rows, seen, rcc_cache = [], {}, {}
    for label, sources in CLASSES.items():
        (out_root / label).mkdir(parents=True)
        for package, rcc_name, selector in sources:
            prefix = "tux" if package == TUX_PKG else "gc"
            for original, licence_key, raw in _sources(package, rcc_name, selector, rcc_cache):
                stem = PurePosixPath(original).stem
                if stem.endswith("_mirror") or stem in EXCLUDE:
                    continue
                im = _prepare(raw)
                pixels = hashlib.sha256(im.tobytes()).hexdigest()
                if pixels in seen:
                    print(f"skip duplicate {original} (same pixels as {seen[pixels]})", file=sys.stderr)
                    continue
                seen[pixels] = original
                name = f"{prefix}_{stem}.jpg"
                n = 2
                while (out_root / label / name).exists():
                    name, n = f"{prefix}_{stem}_{n}.jpg", n + 1
                target = out_root / label / name
                im.save(target, "JPEG", quality=JPEG_QUALITY, optimize=True)
                lic, copyright_ = licences[package].lookup(licence_key if package == TUX_PKG else "src/" + licence_key.split("src/", 1)[-1])
                rows.append({
                    "path": f"similarity/{label}/{name}",
                    "label": label,
                    "source_package": f"{package} {versions[package]}",
                    "original_path": original,
                    "licence": lic,
                    "copyright": copyright_,
                    "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
                })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args(argv)
    data_dir = args.data_dir.resolve()
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        tmp = Path(tmp)
        rows = build(tmp / "similarity")
        with open(tmp / "MANIFEST.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        old = data_dir / "similarity"
        if old.exists():
            shutil.rmtree(old)
        (tmp / "similarity").rename(old)
        (tmp / "MANIFEST.csv").replace(data_dir / "MANIFEST.csv")
    counts = {}
    for r in rows:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    size = sum(p.stat().st_size for p in (data_dir / "similarity").rglob("*.jpg"))
    for label, n in counts.items():
        print(f"{label:20s} {n:4d}")
    print(f"{len(rows)} images in {len(counts)} classes, {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
