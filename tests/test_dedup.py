"""Exact and near-duplicate groups on a folder the test writes, with real features of the default backbone."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from utils_cv.similarity import data, dedup, features, model
from utils_cv.similarity.distances import pairs_within


def _photo(array: np.ndarray, side: int = 320) -> Image.Image:
    im = Image.fromarray(array).convert("RGB")
    im.thumbnail((side, side), Image.Resampling.LANCZOS)
    return im


def _texture(seed: int, size: int = 192) -> Image.Image:
    """Smooth random colour noise: unlike any photo and unlike another seed's."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A plain folder: two photos with edited copies, unrelated photos and a texture.

    Returns (root, paths, groups expected as sets of file names, snapshot of bytes and mtimes)."""
    import skimage.data

    root = tmp_path_factory.mktemp("dups")
    cat, coffee = _photo(skimage.data.chelsea()), _photo(skimage.data.coffee())
    cat.save(root / "cat.jpg", quality=95)
    shutil.copyfile(root / "cat.jpg", root / "cat_exact_copy.jpg")
    cat.resize((cat.width // 2, cat.height // 2), Image.Resampling.LANCZOS).save(root / "cat_small.jpg", quality=90)
    cat.save(root / "cat_recompressed.jpg", quality=30)
    ImageOps.mirror(cat).save(root / "cat_flipped.jpg", quality=90)
    w, h = cat.size
    cat.crop((w // 14, h // 14, w - w // 14, h - h // 14)).save(root / "cat_cropped.jpg", quality=90)
    coffee.save(root / "coffee.png")
    coffee.resize((coffee.width * 3 // 5, coffee.height * 3 // 5)).save(root / "coffee_small.jpg", quality=85)
    ImageOps.mirror(coffee).save(root / "coffee_flipped.jpg", quality=85)
    _photo(skimage.data.rocket()).save(root / "rocket.jpg", quality=90)
    _photo(skimage.data.astronaut()).save(root / "astronaut.jpg", quality=90)
    for name in ("monuments/gc_IndiaGate.jpg", "fish/gc_fish1.jpg", "mammals/gc_cat.jpg"):
        shutil.copyfile(data.default_dataset() / name, root / name.replace("/", "_"))
    _texture(1).save(root / "texture.png")
    # modification times in a known order for keep="oldest": the small copy is the oldest file
    for k, p in enumerate(sorted(root.iterdir())):
        os.utime(p, ns=(1_600_000_000_000_000_000 + k * 10**9,) * 2)
    os.utime(root / "cat_small.jpg", ns=(1_500_000_000_000_000_000,) * 2)
    expected = [{"cat.jpg", "cat_exact_copy.jpg", "cat_small.jpg", "cat_recompressed.jpg", "cat_flipped.jpg",
                 "cat_cropped.jpg"}, {"coffee.png", "coffee_small.jpg", "coffee_flipped.jpg"}]
    snapshot = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.iterdir()}
    paths = sorted(root.iterdir())
    return root, paths, expected, snapshot


@pytest.fixture(scope="module")
def feats(folder):
    _, paths, _, _ = folder
    net, transform = model.create_backbone()
    return features.extract_features(net, paths, transform, batch_size=16, progress=False)


def test_each_copy_is_grouped_with_its_source_and_unrelated_images_stay_alone(folder, feats):
    root, paths, expected, _ = folder
    groups = dedup.find_duplicates(feats, paths)
    assert [{Path(p).name for p in g} for g in groups] == expected  # largest group first
    assert groups[0][0].name in ("cat.jpg", "cat_exact_copy.jpg")  # the original represents its copies


def test_representative_first_and_every_member_within_the_threshold_of_it(folder, feats):
    _, paths, _, _ = folder
    row = {p: i for i, p in enumerate(paths)}
    for g in dedup.duplicate_groups(feats, paths):
        rep = feats[row[g.ids[0]]]
        d = [float(np.linalg.norm(feats[row[p]] - rep)) for p in g.ids]
        assert g.distances[0] == 0.0 and d[0] == 0.0
        np.testing.assert_allclose(g.distances, d, atol=1e-5)
        assert max(d) <= dedup.DEFAULT_THRESHOLD
        assert d == sorted(d)  # the others by ascending distance to the representative


def test_exact_copies_are_at_distance_zero_and_found_by_bytes(folder, feats):
    root, paths, _, _ = folder
    i, j = paths.index(root / "cat.jpg"), paths.index(root / "cat_exact_copy.jpg")
    assert np.linalg.norm(feats[i] - feats[j]) < 1e-6
    assert dedup.exact_duplicates(paths) == [[root / "cat.jpg", root / "cat_exact_copy.jpg"]]


def test_exact_duplicates_compares_bytes_not_sizes_or_names(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "b.bin").write_bytes(b"x" * 100)
    (tmp_path / "c.bin").write_bytes(b"x" * 99 + b"y")  # same size, other bytes
    (tmp_path / "d.bin").write_bytes(b"x" * 101)
    (tmp_path / "e.bin").write_bytes(b"x" * 101)
    paths = sorted(tmp_path.iterdir())
    assert dedup.exact_duplicates(paths) == [[tmp_path / "a.bin", tmp_path / "b.bin"],
                                             [tmp_path / "d.bin", tmp_path / "e.bin"]]


def test_duplicates_to_remove_keeps_one_per_group(folder, feats):
    root, paths, _, _ = folder
    groups = dedup.find_duplicates(feats, paths)
    cat, coffee = groups
    first = dedup.duplicates_to_remove(groups, keep="first")
    assert set(first) == set(cat[1:]) | set(coffee[1:])
    largest = dedup.duplicates_to_remove(groups, keep="largest")
    # four cats have the full size (the original, its byte copy, the mirror, the recompressed
    # one): the file modified first is kept, the original here, not the biggest file
    kept_cat = root / "cat.jpg"
    assert set(largest) == (set(cat) - {kept_cat}) | {root / "coffee_small.jpg", root / "coffee_flipped.jpg"}
    oldest = dedup.duplicates_to_remove(groups, keep="oldest")
    assert root / "cat_small.jpg" not in oldest and root / "coffee.png" not in oldest
    assert len(oldest) == len(first) == len(largest) == 5 + 2
    with pytest.raises(ValueError, match="'keep'.*largest.*Got 'newest'"):
        dedup.duplicates_to_remove(groups, keep="newest")


def test_no_file_in_the_folder_is_touched(folder, feats):
    root, paths, _, snapshot = folder
    groups = dedup.find_duplicates(feats, paths)
    dedup.exact_duplicates(paths)
    for keep in dedup.KEEP:
        dedup.duplicates_to_remove(groups, keep=keep)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.iterdir()} == snapshot


def test_a_chain_of_close_items_is_not_one_group():
    """A-B-C-D on a circle, neighbours 0.6 t apart: A~B~C~D, but A and D (1.8 t) are unrelated."""
    t = 0.4
    step = 2 * np.arcsin(0.6 * t / 2)  # angle whose chord is 0.6 t
    angles = np.arange(4) * step
    x = np.stack([np.cos(angles), np.sin(angles), np.zeros(4)], axis=1).astype(np.float32)
    groups = dedup.find_duplicates(x, list("ABCD"), threshold=t)
    assert groups == [["B", "A", "C"]]  # B has the most neighbours; D left out, not chained
    for g in groups:
        rep = x["ABCD".index(g[0])]
        assert all(np.linalg.norm(x["ABCD".index(m)] - rep) <= t for m in g)
    assert dedup.find_duplicates(x, list("ABCD"), threshold=0.5 * t) == []


def test_features_and_ids_are_checked():
    x = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="'threshold'.*Got 3"):
        dedup.find_duplicates(x, list("abc"), threshold=3)
    with pytest.raises(ValueError, match="'ids' has 2 items.*3 rows"):
        dedup.find_duplicates(x, list("ab"))
    assert dedup.find_duplicates(x[:1], ["a"]) == []


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_pairs_within_matches_brute_force(distance):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 8)).astype(np.float32)
    x[7] = x[3]  # an exact duplicate: distance 0 is within any radius
    if distance == "l2":
        brute = np.linalg.norm(x[:, None] - x[None], axis=2)
        radius = 3.0
    else:
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        brute = 1.0 - u @ u.T
        radius = 0.4
    bi, bj = np.nonzero(np.triu(brute <= radius, 1))
    for block in (None, 7):
        i, j, d = pairs_within(x, radius, distance=distance, block_rows=block)
        assert len(bi) > 20  # the radius keeps a real share of the 1770 pairs
        np.testing.assert_array_equal(i, bi)
        np.testing.assert_array_equal(j, bj)
        np.testing.assert_allclose(d, brute[bi, bj], atol=1e-4)
        assert d.dtype == np.float32 and i.dtype == np.int64


def test_pairs_within_refuses_a_bad_radius():
    with pytest.raises(ValueError, match="'radius'.*Got -1"):
        pairs_within(np.eye(2, dtype=np.float32), -1)


# ---------------------------------------------------------------------------- perceptual hashes
def _bits(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def test_perceptual_hash_survives_resize_recompression_and_grayscale_not_other_images(tmp_path):
    import skimage.data

    cat = _photo(skimage.data.chelsea())
    cat.save(tmp_path / "cat.jpg", quality=95)
    cat.resize((cat.width // 3, cat.height // 3), Image.Resampling.LANCZOS).save(tmp_path / "small.jpg", quality=90)
    cat.save(tmp_path / "q20.jpg", quality=20)
    ImageOps.grayscale(cat).save(tmp_path / "gray.png")
    h = {p.stem: dedup.perceptual_hash(p) for p in tmp_path.iterdir()}
    assert h["cat"] == dedup.perceptual_hash(Image.open(tmp_path / "cat.jpg"))  # a PIL image: the same hash
    for name in ("small", "q20", "gray"):
        assert _bits(h["cat"], h[name]) <= dedup.HASH_THRESHOLD, name
    others = [dedup.perceptual_hash(_photo(a)) for a in (skimage.data.coffee(), skimage.data.rocket(),
                                                            skimage.data.astronaut())]
    assert min(_bits(h["cat"], o) for o in others) > 3 * dedup.HASH_THRESHOLD


def test_framed_and_letterboxed_copies_trim_to_their_source_and_keep_its_hash():
    import skimage.data

    cat = _photo(skimage.data.chelsea())
    w, h = cat.size
    drawing = ImageOps.expand(cat, border=24, fill=(255, 255, 255))  # a picture on a white margin
    copies = {
        "frame": ImageOps.expand(cat, border=17, fill=(40, 200, 90)),
        "letterbox": ImageOps.expand(cat, border=(0, h // 8, 0, h // 8), fill=(0, 0, 0)),
        "letterbox around the margin": ImageOps.expand(drawing, border=(30, 0, 30, 0), fill=(0, 0, 0)),
    }
    for name, im in copies.items():
        im = Image.open(_jpeg(im))  # the bars' edges blur as in any JPEG
        assert abs(dedup.trim_borders(im).width - w) <= 2 and abs(dedup.trim_borders(im).height - h) <= 2, name
        assert _bits(dedup.perceptual_hash(im), dedup.perceptual_hash(cat)) <= dedup.HASH_THRESHOLD, name
    assert dedup.trim_borders(cat) is cat  # nothing uniform: the image itself
    blank = Image.new("RGB", (64, 48), (255, 255, 255))
    assert dedup.trim_borders(blank) is blank  # nothing would be left: untouched
    assert dedup.perceptual_hash(blank) == dedup.perceptual_hash(blank.resize((32, 24)))


def _jpeg(im: Image.Image):
    import io

    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    buf.seek(0)
    return buf


def test_hash_pairs_matches_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 300, dtype=np.uint64)
    flips = rng.integers(0, 64, (300, 3))
    near = base.copy()
    for r in range(150):  # half the hashes get a near copy (1-3 bits flipped)
        for b in flips[r, : 1 + r % 3]:
            near[r] ^= np.uint64(1) << np.uint64(b)
    h = np.concatenate([base, near[:150]])
    i, j = dedup.hash_pairs(h, 3)
    got = set(zip(i.tolist(), j.tolist()))
    brute = {(a, b) for a in range(len(h)) for b in range(a + 1, len(h)) if _bits(int(h[a]), int(h[b])) <= 3}
    assert got == brute and len(got) >= 150
    with pytest.raises(ValueError, match="'max_distance'"):
        dedup.hash_pairs(h, 65)


def test_hashes_group_a_grayscale_copy_the_embeddings_alone_miss(tmp_path):
    import skimage.data

    coffee = _photo(skimage.data.coffee())
    items = [coffee, ImageOps.grayscale(coffee).convert("RGB"), _photo(skimage.data.rocket())]
    net, tf = model.create_backbone()
    x = features.extract_features(net, items, tf, progress=False)
    gap = float(np.linalg.norm(x[0] - x[1]))
    hashes = [dedup.perceptual_hash(im) for im in items]
    threshold = gap * 0.9  # an embedding threshold the grayscale copy does not pass
    assert dedup.find_duplicates(x, ["c", "g", "r"], threshold) == []
    groups = dedup.duplicate_groups(x, ["c", "g", "r"], threshold, hashes=hashes)
    assert [sorted(g.ids) for g in groups] == [["c", "g"]]
    assert groups[0].distances[1] == pytest.approx(gap, abs=1e-5)  # the embedding distance, beyond the threshold
    assert dedup.find_duplicates(x, ["c", "g", "r"], threshold, hashes=[hashes[0], None, hashes[2]]) == []
    with pytest.raises(ValueError, match="'hashes'"):
        dedup.duplicate_groups(x, ["c", "g", "r"], threshold, hashes=hashes[:2])


def test_extraction_hashes_equal_perceptual_hash_of_the_files(folder):
    root, paths = folder[0], folder[1]
    net, tf = model.create_backbone()
    got = features.FeatureExtractor(net, tf).extract(paths[:6] + [root / "missing.jpg"], on_error="skip",
                                                     progress=False, hashes=True)
    assert len(got.hashes) == len(got.kept) == 6
    assert got.hashes == [dedup.perceptual_hash(paths[int(k)]) for k in got.kept]
