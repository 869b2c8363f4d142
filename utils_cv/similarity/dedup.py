"""Exact and near duplicates in a collection of images.

Two passes, cheapest and most certain first:

1. **Exact duplicates**: files with the same bytes (same size, then the same sha256).
2. **Near duplicates**: every pair of images whose embeddings lie within ``threshold`` of
   each other (a range search over all pairs, :func:`~utils_cv.similarity.distances.pairs_within`,
   not only the k nearest), grouped.

Grouping without chaining: connected components of the "within threshold" graph can chain
unrelated images through a long path (A~B, B~C, ... while A and Z differ). Each component is
therefore split greedily: the member with the most neighbours inside the component (ties: the
smallest sum of distances, then the lowest row) becomes the representative, its group is every
member within ``threshold`` of it, and the rest is grouped again the same way. So every member of
a group is within ``threshold`` of the group's representative, which comes first; the others
follow by ascending distance to it.

The default threshold :data:`DEFAULT_THRESHOLD` (0.49) is an L2 distance between L2-normalised
features of the default backbone (EfficientNet-Lite0, ImageNet weights), calibrated on the
near-duplicate benchmark (``benchmarks/bench_dedup.py``, BENCHMARKS.md: 1,954 files, 141 real
photos and data-set images with 10 edited copies each, 403 distractors) as the largest threshold
whose duplicate pairs keep a precision of at least 0.98: there, 98 % of the pairs it groups are
true copies and it finds 75 % of all copy pairs (F1 0.84); exact copies lie at 0.000, flipped,
recoloured, captioned and rotated copies mostly below 0.3-0.45, while grayscale copies (median
0.58), strong downscales of small images and crops are what it misses. A larger threshold trades
precision for recall: 0.62 gives the best F1 (0.89; precision 0.89, recall 0.90). Distinct images
of the benchmark lie 0.30 or more apart (median 0.89). Features of another model need their own
threshold (``benchmarks/bench_dedup.py --features`` finds it).
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

__all__ = ["DEFAULT_THRESHOLD", "DuplicateGroup", "KEEP", "duplicate_groups", "duplicates_to_remove",
           "exact_duplicates", "find_duplicates"]

DEFAULT_THRESHOLD = 0.49  # precision >= 0.98 on the benchmark; see the module doc
KEEP = ("largest", "first", "oldest")
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


def duplicate_groups(features, ids: Sequence, threshold: float | None = None) -> list[DuplicateGroup]:
    """Groups of near-duplicate items (size >= 2), largest first; see the module doc.

    Args:
        features: (n, d) features, L2-normalised (``features.extract_features`` gives them).
        ids: n ids (e.g. file paths), aligned with the rows.
        threshold: L2 distance under which two items are duplicates; None uses
            :data:`DEFAULT_THRESHOLD`.
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


def find_duplicates(features, ids: Sequence, threshold: float | None = None) -> list[list]:
    """Groups of duplicate ids (each a list of size >= 2, the representative first, the others
    by ascending distance to it), largest group first."""
    return [g.ids for g in duplicate_groups(features, ids, threshold)]


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
