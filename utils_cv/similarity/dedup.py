"""Exact and near duplicates in a collection of images.

Two passes, cheapest and most certain first:

1. **Exact duplicates**: files with the same bytes (same size, then the same sha256).
2. **Near duplicates**: every pair of images whose embeddings lie within ``threshold`` of
   each other (a range search over all pairs, :func:`~utils_cv.similarity.distances.pairs_within`,
   not only the k nearest), and, when perceptual hashes are given (:func:`perceptual_hash`; a
   collection from ``index`` stores one per image), every pair whose hashes differ in at most
   ``hash_threshold`` bits; the pairs are then grouped.

Grouping without chaining: connected components of the "duplicate pair" graph can chain
unrelated images through a long path (A~B, B~C, ... while A and Z differ). Each component is
therefore split greedily: the member with the most neighbours inside the component (ties: the
smallest sum of distances, then the lowest row) becomes the representative, its group is every
member paired with it, and the rest is grouped again the same way. So every member of a group
is within ``threshold`` of the group's representative (or has a hash that close to its hash),
which comes first; the others follow by ascending embedding distance to it.

The defaults :data:`DEFAULT_THRESHOLD` (0.50, an L2 distance between L2-normalised features of
the default backbone, EfficientNet-Lite0 with ImageNet weights) and :data:`HASH_THRESHOLD` (6
bits of 64) are calibrated on the near-duplicate benchmark (``benchmarks/bench_dedup.py``,
BENCHMARKS.md: 1,954 files, 141 real photos and data-set images with 10 edited copies each, 403
distractors): 0.50 is the largest threshold whose duplicate pairs keep a precision of at least
0.98 with the hashes. There 98 % of the pairs it groups are true copies (0.983) and it finds 93 %
of all copy pairs (0.928; F1 0.955). The two signals complement each other: the hashes, taken
after uniform borders are trimmed, find grayscale copies, strong downscales, recompressions and
framed or letterboxed copies that the colour features miss (grayscale recall 0.33 without them,
0.99 with; borders 0.86 and 0.99), the features find flipped, cropped and rotated copies that
change the hash. Crops stay the hardest (recall 0.70). A larger threshold trades precision for
recall (0.55: precision 0.953, recall 0.955). Distinct images of the benchmark lie 0.30 or more
apart (median 0.89). Features of another model need their own threshold
(``benchmarks/bench_dedup.py --features`` finds it). Without hashes, the same 0.50 kept a
precision of 0.979 on the benchmark (F1 0.852).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from utils_cv.similarity._checks import as_matrix
from utils_cv.similarity.distances import pairs_within

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_THRESHOLD", "HASH_THRESHOLD", "PHASH_VERSION", "DuplicateGroup", "KEEP", "duplicate_groups",
           "duplicates_to_remove", "exact_duplicates", "find_duplicates", "hash_pairs", "perceptual_hash",
           "trim_borders", "try_perceptual_hash"]

DEFAULT_THRESHOLD = 0.50  # with the perceptual hashes: precision >= 0.98 on the benchmark; see the module doc
HASH_THRESHOLD = 6  # differing bits of 64 under which two perceptual hashes mark a duplicate
PHASH_VERSION = 2  # 2: borders trimmed before hashing; a collection keeps the version of its hashes
KEEP = ("largest", "first", "oldest")
_BORDER_TOLERANCE = 16  # grey levels (of 255) within which a line counts as the border's colour
_BORDER_SHARE = 0.98  # share of a line's pixels that must be that colour
_BLOCK_ROWS = 1024


@dataclass
class DuplicateGroup:
    """Ids of one group (the representative first) and each one's distance to it (0.0 first)."""

    ids: list
    distances: list[float]
    exact: bool = False  # all members have the same bytes

    def as_dict(self) -> dict:
        return {"ids": [str(i) for i in self.ids], "distances": [round(float(d), 6) for d in self.distances],
                "exact": self.exact}


def _check_threshold(threshold) -> float:
    if threshold is None:
        return DEFAULT_THRESHOLD
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)) \
            or not 0 <= threshold <= 2:
        raise ValueError(f"The 'threshold' parameter must be an L2 distance in [0, 2] (features are L2-normalised; "
                         f"default {DEFAULT_THRESHOLD}). Got {threshold!r} instead.")
    return float(threshold)


def _split_component(members: np.ndarray, neighbours: dict, dist: dict) -> list[list[int]]:
    """Greedy split of one connected component into groups centred on a representative."""
    left = set(members.tolist())
    groups = []
    while len(left) > 1:
        def score(m):
            near = [o for o in neighbours.get(m, ()) if o in left]
            return (-len(near), sum(dist[(min(m, o), max(m, o))] for o in near), m)

        rep = min(left, key=score)
        near = [o for o in neighbours.get(rep, ()) if o in left]
        if not near:  # every remaining member is isolated from the others now
            break
        group = [rep] + sorted(near, key=lambda o: (dist[(min(rep, o), max(rep, o))], o))
        groups.append(group)
        left -= set(group)
    return groups


# ---------------------------------------------------------------------------- perceptual hashes
def _uniform_lines(lines: np.ndarray) -> int:
    """How many lines of ``lines`` (from an edge inward) are of the first line's colour.
    Lines are tested in growing chunks from the edge: most images stop at the first chunk."""
    ref = np.median(lines[0])
    start, step = 0, 8
    while start < len(lines):
        ok = (np.abs(lines[start:start + step] - ref) <= _BORDER_TOLERANCE).mean(axis=1) >= _BORDER_SHARE
        if not ok.all():
            return start + int(np.argmin(ok))
        start, step = start + step, 2 * step
    return len(lines)


def trim_borders(image, rounds: int = 4, min_side: int = 8):
    """``image`` (PIL) without its uniform borders: frames, letterbox bars and plain margins
    (rows and columns whose grey levels are, for 98 % of their pixels, within 16 of the edge
    line's). Up to ``rounds`` bands are peeled (a black letterbox bar, then the white margin of a
    drawing inside it), so a framed copy and its source come down to the same content. Returns
    the image itself when nothing is uniform or less than ``min_side`` pixels would be left (a
    blank image)."""
    a = np.asarray(image.convert("L"), dtype=np.int16)
    top, bottom, left, right = 0, a.shape[0], 0, a.shape[1]
    for _ in range(rounds):
        b = a[top:bottom, left:right]
        if min(b.shape) < min_side:
            return image
        t, bo = _uniform_lines(b), _uniform_lines(b[::-1])
        le, ri = _uniform_lines(b.T), _uniform_lines(b.T[::-1])
        if not (t or bo or le or ri):
            break
        top, bottom, left, right = top + t, bottom - bo, left + le, right - ri
        if min(bottom - top, right - left) < min_side:
            return image
    if (top, bottom, left, right) == (0, a.shape[0], 0, a.shape[1]):
        return image
    return image.crop((left, top, right, bottom))


def perceptual_hash(item) -> int:
    """The 64-bit DCT perceptual hash (pHash) of an image file or PIL image: uniform borders
    trimmed (:func:`trim_borders`), grey levels at 32 x 32, the 8 x 8 lowest frequencies of their
    2-D DCT, one bit per coefficient above their median (the constant term left out of the
    median). Resized, recompressed, recoloured, grayscale, framed and letterboxed copies keep
    (almost) the same bits; crops and flips do not. Files are decoded as the feature extractor
    of the default backbone decodes them (``data.load_image(min_size=256)``: big JPEGs at a
    reduced scale); ``FeatureExtractor.extract(hashes=True)`` hashes that same decoded image, so
    indexing pays for one decode. :data:`PHASH_VERSION` names this definition (collections
    recompute hashes of another version)."""
    from PIL import Image
    from scipy.fft import dctn

    from utils_cv.similarity.data import load_image, to_rgb

    image = load_image(item, min_size=256) if isinstance(item, (str, os.PathLike)) else to_rgb(item)
    if min(image.size) >= 512:  # a full-size decode: box-reduce first, as load_image(min_size=256) would
        image = image.reduce(min(image.size) // 256)
    grey = np.asarray(trim_borders(image).convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dctn(grey, norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


def try_perceptual_hash(item) -> int | None:
    """:func:`perceptual_hash`, or None when it fails (the feature extractor keeps an image that
    decoded even if hashing it fails)."""
    try:
        return perceptual_hash(item)
    except Exception as exc:  # noqa: BLE001 - reported, and the image has no hash
        logger.warning("no perceptual hash for %s: %s", item if isinstance(item, (str, os.PathLike)) else "an image", exc)
        return None


def hash_pairs(hashes, max_distance: int = HASH_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """``(i, j)`` with i < j for every pair of 64-bit hashes differing in at most
    ``max_distance`` bits (blocked XOR and bit counts: 10,000 hashes in well under a second)."""
    if isinstance(max_distance, bool) or not isinstance(max_distance, (int, np.integer)) or not 0 <= max_distance <= 64:
        raise ValueError(f"The 'max_distance' parameter must be a number of bits in [0, 64]. Got {max_distance!r}.")
    h = np.asarray([int(v) for v in hashes], dtype=np.uint64)
    out_i, out_j = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for s in range(0, len(h), _BLOCK_ROWS):  # each block against itself and the rows after it only
        a, b = np.nonzero(np.bitwise_count(h[s:s + _BLOCK_ROWS, None] ^ h[None, s:]) <= max_distance)
        keep = b > a
        out_i.append(a[keep].astype(np.int64) + s)
        out_j.append(b[keep].astype(np.int64) + s)
    return np.concatenate(out_i), np.concatenate(out_j)


def _union_hash_pairs(x, i, j, d, hashes, hash_threshold):
    """The embedding pairs plus the pairs whose hashes are close (``None`` hashes take no part);
    every pair's distance is its embedding distance."""
    if len(hashes) != len(x):
        raise ValueError(f"'hashes' has {len(hashes)} items but 'features' has {len(x)} rows: they must be aligned.")
    known = np.array([h is not None for h in hashes])
    rows = np.flatnonzero(known)
    hi, hj = hash_pairs([hashes[r] for r in rows], HASH_THRESHOLD if hash_threshold is None else hash_threshold)
    n = len(x)
    have = set((i * n + j).tolist())
    new = [(a, b) for a, b in zip(rows[hi].tolist(), rows[hj].tolist()) if a * n + b not in have]
    if not new:
        return i, j, d
    a, b = np.array(new, dtype=np.int64).T
    extra = np.linalg.norm(x[a] - x[b], axis=1).astype(d.dtype)
    logger.debug("%d pair(s) added by perceptual hashes", len(a))
    return np.concatenate([i, a]), np.concatenate([j, b]), np.concatenate([d, extra])


# ---------------------------------------------------------------------------- groups
def duplicate_groups(features, ids: Sequence, threshold: float | None = None, hashes: Sequence | None = None,
                     hash_threshold: int | None = None) -> list[DuplicateGroup]:
    """Groups of near-duplicate items (size >= 2), largest first; see the module doc.

    Args:
        features: (n, d) features, L2-normalised (``features.extract_features`` gives them).
        ids: n ids (e.g. file paths), aligned with the rows.
        threshold: L2 distance under which two items are duplicates; None uses
            :data:`DEFAULT_THRESHOLD`.
        hashes: n perceptual hashes (:func:`perceptual_hash`; None for an item without one),
            aligned with the rows: two items whose hashes differ in at most ``hash_threshold``
            bits (None: :data:`HASH_THRESHOLD`) are duplicates too, whatever their embedding
            distance. Without hashes, grayscale copies and strong downscales are often missed.
    """
    x = as_matrix(features, "features")
    ids = list(ids)
    if len(ids) != len(x):
        raise ValueError(f"'ids' has {len(ids)} items but 'features' has {len(x)} rows: they must be aligned.")
    t = _check_threshold(threshold)
    if len(x) < 2:
        return []
    # row blocks of 1,024: each block is compared with the rows after its start only, so smaller
    # blocks skip more of the lower triangle (55 M instead of 78 M products for 10,000 rows)
    i, j, d = pairs_within(x, t, block_rows=_BLOCK_ROWS)
    if hashes is not None:
        i, j, d = _union_hash_pairs(x, i, j, d, list(hashes), hash_threshold)
    neighbours: dict[int, list[int]] = {}
    dist = {}
    for a, b, v in zip(i.tolist(), j.tolist(), d.tolist()):
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
        dist[(a, b)] = v
    # connected components (union-find over the pairs)
    parent = np.arange(len(x))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(a) for a in range(len(x))])
    groups = []
    for root in np.unique(roots[list(neighbours)]) if neighbours else []:
        members = np.flatnonzero(roots == root)
        for g in _split_component(members, neighbours, dist):
            rep = g[0]
            groups.append(DuplicateGroup([ids[m] for m in g],
                                         [0.0] + [dist[(min(rep, o), max(rep, o))] for o in g[1:]]))
    groups.sort(key=lambda g: (-len(g.ids), str(g.ids[0])))
    logger.info("%d duplicate group(s) among %d items at threshold %.3f", len(groups), len(x), t)
    return groups


def find_duplicates(features, ids: Sequence, threshold: float | None = None, hashes: Sequence | None = None,
                    hash_threshold: int | None = None) -> list[list]:
    """Groups of duplicate ids (each a list of size >= 2, the representative first, the others
    by ascending distance to it), largest group first; arguments as :func:`duplicate_groups`."""
    return [g.ids for g in duplicate_groups(features, ids, threshold, hashes, hash_threshold)]


def exact_duplicates(paths: Sequence) -> list[list]:
    """Groups of files with identical bytes (size, then sha256), each sorted by path."""
    from utils_cv.common.download import sha256sum

    by_size: dict[int, list] = {}
    for p in paths:
        by_size.setdefault(os.stat(p).st_size, []).append(p)
    groups = []
    for same_size in by_size.values():
        if len(same_size) < 2:
            continue
        by_hash: dict[str, list] = {}
        for p in same_size:
            by_hash.setdefault(sha256sum(p), []).append(p)
        groups += [sorted(g, key=str) for g in by_hash.values() if len(g) > 1]
    return sorted(groups, key=lambda g: (-len(g), str(g[0])))


def _pixels(path) -> int:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[0] * im.size[1]
    except Exception:  # noqa: BLE001 - an unreadable file is the smallest
        return -1


def duplicates_to_remove(groups: Sequence[Sequence], keep: str = "largest") -> list:
    """The ids a person could delete: all but one of each group. Nothing is deleted here.

    Args:
        groups: from :func:`find_duplicates` (ids that are file paths for ``largest`` and
            ``oldest``).
        keep: ``"largest"`` keeps the image with the most pixels (then the file modified first,
            then the first in the group); ``"first"`` keeps the representative; ``"oldest"`` keeps the file modified
            first.
    """
    if keep not in KEEP:
        raise ValueError(f"The 'keep' parameter must be one of {list(KEEP)}. Got {keep!r} instead.")
    remove, seen = [], set()
    for group in groups:
        group = list(group.ids if isinstance(group, DuplicateGroup) else group)
        if keep == "first":
            kept = group[0]
        elif keep == "largest":
            # most pixels; between equals (the original and its byte, flipped or recompressed
            # copies) the file modified first, usually the original, not the biggest file, which
            # can be a copy re-saved at a higher JPEG quality
            kept = max(group, key=lambda p: (_pixels(p), -Path(p).stat().st_mtime_ns, -group.index(p)))
        else:
            kept = min(group, key=lambda p: (Path(p).stat().st_mtime_ns, group.index(p)))
        for p in group:
            if p != kept and p not in seen:
                seen.add(p)
                remove.append(p)
    return remove
