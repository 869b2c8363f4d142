"""Near-duplicate detection: this library against imagededup's four hashes, on one benchmark, in one run.

    .venv/bin/python benchmarks/build_photos.py && .venv/bin/python benchmarks/build_dedup_set.py
    .venv/bin/pip install --no-deps imagededup PyWavelets     # the comparison (not a project dependency)
    .venv/bin/python benchmarks/bench_dedup.py [--bench DIR] [--backbone efficientnet_lite0] [--features F.npy]

Scored unit: duplicate PAIRS of files. A pair is true when both files come from the same source
photo (the source and its edited copies, see ``build_dedup_set.py``); precision, recall and F1
are over all pairs of the benchmark's files. Rows:

* ``utils_cv ... + pHash``: features of the backbone (``features.extract_features``) and
  ``dedup.perceptual_hash`` of every file, then ``dedup.duplicate_groups(..., hashes=...)``
  (the library's default, what ``utils-cv-similarity duplicates`` does); the pairs are those
  inside the returned groups (what a user gets). ``alone``: the features without the hashes;
  ``raw pairs`` scores the pairs of ``distances.pairs_within`` before grouping, to show what
  grouping costs or gains. Thresholds: ``DEFAULT_THRESHOLD`` and the best one of a sweep (by F1).
* imagededup's PHash, DHash, WHash and AHash: ``encode_images`` then ``find_duplicates`` at its
  default ``max_distance_threshold`` (10) and at the best of 0..32 (by F1). The sweep uses
  Hamming distances computed here from the same encodings, checked against ``find_duplicates``
  at the default.

``encode s`` is feature extraction or hashing (cached in the benchmark folder with the time it
took, so reruns are quick: ``--no-cache`` recomputes), ``search s`` the grouping or search.
Also printed: recall per edit kind (source-copy pairs) for this library and the best hash, the
calibration line (the largest threshold whose group precision stays >= ``--precision``) and the
time to deduplicate ``--timing-n`` synthetic clustered unit vectors (dim 1280) given as features.
``--features F.npy`` scores features of another model (rows aligned with ``files.csv``) and
finds their threshold.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from utils_cv.similarity import dedup
from utils_cv.similarity.distances import l2_normalize, pairs_within

HASHES = ("PHash", "DHash", "WHash", "AHash")
HASH_DEFAULT = 10  # imagededup's default max_distance_threshold


def load_truth(bench: Path):
    with open(bench / "files.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["file"])
    files = [r["file"] for r in rows]
    row_of = {name: i for i, name in enumerate(files)}
    origin = np.array([row_of[r["source"]] if r["source"] else -1 - i for i, r in enumerate(rows)])
    n = len(files)
    keys = []
    for s in np.unique(origin[origin >= 0]):
        members = np.flatnonzero(origin == s)
        a, b = np.triu_indices(len(members), 1)
        keys.append(members[a] * n + members[b])
    true_keys = np.unique(np.concatenate(keys))
    copies = [(row_of[r["source"]], i, r["edit"]) for i, r in enumerate(rows) if r["role"] == "copy"]
    return files, rows, true_keys, copies


def pair_keys(i, j, n: int) -> np.ndarray:
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    return np.unique(np.minimum(i, j) * n + np.maximum(i, j))


def group_keys(groups, n: int) -> np.ndarray:
    keys = [np.empty(0, np.int64)]
    for g in groups:
        g = np.asarray(g, np.int64)
        a, b = np.triu_indices(len(g), 1)
        keys.append(np.minimum(g[a], g[b]) * n + np.maximum(g[a], g[b]))
    return np.unique(np.concatenate(keys))


def prf(pred: np.ndarray, true_keys: np.ndarray) -> tuple[float, float, float]:
    tp = int(np.isin(pred, true_keys, assume_unique=True).sum())
    p = tp / len(pred) if len(pred) else 1.0
    r = tp / len(true_keys)
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def edit_recall(pred: np.ndarray, copies, n: int) -> dict[str, float]:
    found: dict[str, list[bool]] = {}
    pred_set = set(pred.tolist())
    for s, c, e in copies:
        found.setdefault(e, []).append(min(s, c) * n + max(s, c) in pred_set)
    return {e: float(np.mean(v)) for e, v in found.items()}


def _digests(bench: Path, files) -> list[str]:
    import hashlib

    return [hashlib.sha256((bench / "images" / f).read_bytes()).hexdigest() for f in files]


def _gray_input(transform):
    from PIL import ImageOps

    return lambda im: transform(ImageOps.grayscale(im).convert("RGB"))


def our_features(bench: Path, files, digests, backbone: str, features_path: Path | None, cache: bool,
                 gray: bool = False):
    """Features of every file: (n, d), extraction seconds for all n, label. Cached by file content
    (``cache_features_*.npz``: a rebuilt benchmark re-embeds only new files); the seconds are n
    over the rate measured when most of them were embedded."""
    if features_path is not None:
        x = l2_normalize(np.load(features_path))
        if len(x) != len(files):
            raise SystemExit(f"{features_path} has {len(x)} rows; the benchmark has {len(files)} files")
        return x, float("nan"), features_path.stem
    label = backbone + (" grayscale input" if gray else "")
    cached = bench / f"cache_features_{backbone}{'_gray' if gray else ''}.npz"
    known, rate, measured = {}, float("nan"), 0
    if cache and cached.is_file():
        z = np.load(cached)
        known = dict(zip(z["digests"].tolist(), z["features"]))
        rate, measured = float(z["rate"]), int(z["measured"])
    todo = sorted({d: i for i, d in reversed(list(enumerate(digests))) if d not in known}.values())
    if todo:
        from utils_cv.similarity import features, model

        net, transform = model.create_backbone(backbone)
        if gray:
            transform = _gray_input(transform)
        t = time.perf_counter()
        new = features.extract_features(net, [bench / "images" / files[i] for i in todo], transform, progress=True)
        seconds = time.perf_counter() - t
        known.update({digests[i]: v for i, v in zip(todo, new)})
        if len(todo) >= measured:
            rate, measured = len(todo) / seconds, len(todo)
        np.savez(cached, digests=np.array(list(known)), features=np.stack(list(known.values())), rate=rate,
                 measured=measured)
    x = np.ascontiguousarray(np.stack([known[d] for d in digests]), dtype=np.float32)
    return x, len(files) / rate, label


def our_hashes(bench: Path, files, digests, cache: bool):
    """``dedup.perceptual_hash`` of every file (cached by content like the features) and the
    seconds they took."""
    cached = bench / f"cache_phash_v{dedup.PHASH_VERSION}.json"  # by content and hash definition
    known = json.loads(cached.read_text()) if cache and cached.is_file() else {}
    todo = [i for i, d in enumerate(digests) if d not in known]
    seconds = known.pop("__seconds_per_image__", 0.0) * len(files)
    if todo:
        t = time.perf_counter()
        for i in todo:
            known[digests[i]] = dedup.perceptual_hash(bench / "images" / files[i])
        seconds = (time.perf_counter() - t) / len(todo) * len(files)
        cached.write_text(json.dumps({**known, "__seconds_per_image__": seconds / len(files)}))
    return [known[d] for d in digests], seconds


def ours(x, true_keys, copies, n: int, grid: np.ndarray, hashes=None):
    """Sweep of group and raw pair scores over ``grid``: {threshold: (p, r, f1, seconds, keys)}
    (with ``hashes``, the groups of ``dedup.duplicate_groups(..., hashes=...)``)."""
    i, j, d = pairs_within(x, float(grid.max()))
    raw, grouped = {}, {}
    for t in grid:
        keep = d <= t
        raw[t] = (*prf(pair_keys(i[keep], j[keep], n), true_keys), float("nan"), pair_keys(i[keep], j[keep], n))
        start = time.perf_counter()
        groups = dedup.find_duplicates(x, np.arange(n), threshold=float(t), hashes=hashes)
        seconds = time.perf_counter() - start
        keys = group_keys(groups, n)
        grouped[t] = (*prf(keys, true_keys), seconds, keys)
        if grouped[t][0] < 0.5 and t > dedup.DEFAULT_THRESHOLD:  # past any useful threshold
            break
    return grouped, raw


def hashes(bench: Path, files, digests, true_keys, cache: bool):
    from imagededup import methods

    n = len(files)
    row_of = {f: i for i, f in enumerate(files)}
    out = {}
    for name in HASHES:
        method = getattr(methods, name)(verbose=False)
        cached = bench / f"cache_hash_{name}.json"  # by file content, like the features
        blob = json.loads(cached.read_text()) if cache and cached.is_file() else {}
        if all(d in blob.get("encodings", {}) for d in digests):
            enc = {f: blob["encodings"][d] for f, d in zip(files, digests)}
            enc_s = blob["seconds"]
        else:
            t = time.perf_counter()
            enc = method.encode_images(image_dir=bench / "images")
            enc_s = time.perf_counter() - t
            cached.write_text(json.dumps({"seconds": enc_s, "encodings": {d: enc.get(f) for f, d in zip(files, digests)}}))
        enc = {k: v for k, v in enc.items() if v}
        codes = np.array([int(enc[f], 16) if f in enc else 0 for f in files], dtype=np.uint64)
        valid = np.array([f in enc for f in files])
        a, b = np.triu_indices(n, 1)
        ok = valid[a] & valid[b]
        a, b = a[ok], b[ok]
        ham = np.bitwise_count(codes[a] ^ codes[b]).astype(np.int16)
        sweep = {t: (*prf(pair_keys(a[ham <= t], b[ham <= t], n), true_keys),) for t in range(0, 33)}
        best = max(sweep, key=lambda t: (sweep[t][2], -t))
        timed = {}
        for t in sorted({HASH_DEFAULT, best}):
            start = time.perf_counter()
            dups = method.find_duplicates(encoding_map=enc, max_distance_threshold=t)
            seconds = time.perf_counter() - start
            keys = pair_keys([row_of[q] for q, ds in dups.items() for _ in ds],
                             [row_of[o] for ds in dups.values() for o in ds], n)
            mine = pair_keys(a[ham <= t], b[ham <= t], n)
            if not np.array_equal(keys, mine):
                print(f"warning: {name} at {t}: find_duplicates gives {len(keys)} pairs, the sweep {len(mine)}",
                      file=sys.stderr)
            timed[t] = (*prf(keys, true_keys), seconds, keys)
        out[name] = {"encode_s": enc_s, "timed": timed, "best": best, "sweep": sweep, "missing": int((~valid).sum())}
    return out


def synthetic_timing(n: int, threshold: float, seed: int = 0, dim: int = 1280, repeats: int = 3):
    """Seconds of ``find_duplicates`` (features and perceptual hashes given) on ``n`` clustered
    unit vectors: 100 'classes' (unrelated
    images about 0.9 apart, like real photos), 30 % of the items in near-duplicate groups of 2-5
    (0.1-0.4 from their original)."""
    rng = np.random.default_rng(seed)
    classes = rng.standard_normal((100, dim)).astype(np.float32)
    classes = l2_normalize(classes)

    def jitter(base, scale):
        noise = rng.standard_normal(base.shape).astype(np.float32)
        noise *= (np.asarray(scale, np.float32).reshape(-1, 1) / np.linalg.norm(noise, axis=1, keepdims=True))
        return l2_normalize(base + noise)

    rows = []
    while sum(len(r) for r in rows) < n:
        centre = jitter(classes[rng.integers(100)][None], 0.83)
        k = int(rng.integers(2, 6)) if rng.random() < 0.109 else 1  # 30 % of the items in groups
        rows.append(centre if k == 1 else np.vstack([centre, jitter(np.repeat(centre, k - 1, 0),
                                                                     rng.uniform(0.1, 0.4, k - 1))]))
    x = np.ascontiguousarray(np.vstack(rows)[:n])
    ids = [f"img_{i:05d}.jpg" for i in range(n)]
    hashes = rng.integers(0, 2**63, n, dtype=np.int64).tolist()  # given too, as a collection stores them
    times, cpu, groups = [], [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        groups = dedup.find_duplicates(x, ids, threshold=threshold, hashes=hashes)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return float(np.median(times)), float(np.median(cpu)), len(groups), sum(len(g) for g in groups)


def fmt(x, digits=3):
    return "-" if x != x else f"{x:.{digits}f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", type=Path, default=None, help="output of build_dedup_set.py")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--features", type=Path, default=None, help="(n, d) .npy aligned with files.csv")
    parser.add_argument("--precision", type=float, default=0.98, help="calibration: precision to keep")
    parser.add_argument("--timing-n", type=int, default=10_000)
    parser.add_argument("--no-hashes", action="store_true", help="skip imagededup")
    parser.add_argument("--gray-input", action="store_true",
                        help="also score features of grayscale inputs (colour-blind: finds grayscale copies)")
    parser.add_argument("--no-cache", action="store_true", help="recompute features and hashes")
    args = parser.parse_args(argv)
    if args.bench is None:
        from utils_cv.common.paths import cache_dir

        args.bench = cache_dir("bench") / "dedup"
    files, rows, true_keys, copies = load_truth(args.bench)
    n = len(files)
    digests = _digests(args.bench, files)
    x, enc_s, label = our_features(args.bench, files, digests, args.backbone, args.features, not args.no_cache)
    grid = np.round(np.arange(0.05, 1.3001, 0.01), 2)
    ph, ph_s = our_hashes(args.bench, files, digests, not args.no_cache)
    emb_only, raw = ours(x, true_keys, copies, n, grid)
    grouped, _ = ours(x, true_keys, copies, n, grid, hashes=ph)  # the library's default: embeddings + pHash
    default = dedup.DEFAULT_THRESHOLD
    t_default = min(grouped, key=lambda t: abs(t - default))
    if abs(t_default - default) > 1e-9:
        groups = dedup.find_duplicates(x, np.arange(n), threshold=default, hashes=ph)
        grouped[default] = (*prf(group_keys(groups, n), true_keys), float("nan"), group_keys(groups, n))
        t_default = default
    best = max(grouped, key=lambda t: (grouped[t][2], -t))
    best_e = max(emb_only, key=lambda t: (emb_only[t][2], -t))
    best_raw = max(raw, key=lambda t: (raw[t][2], -t))
    keep_p = [t for t in grouped if grouped[t][0] >= args.precision]
    calibrated = max(keep_p) if keep_p else float("nan")
    hs = {} if args.no_hashes else hashes(args.bench, files, digests, true_keys, not args.no_cache)
    extra = []
    if args.gray_input and args.features is None:
        xg, enc_g, label_g = our_features(args.bench, files, digests, args.backbone, None, not args.no_cache, gray=True)
        grouped_g, _ = ours(xg, true_keys, copies, n, grid)
        best_g = max(grouped_g, key=lambda t: (grouped_g[t][2], -t))
        t_g = min(grouped_g, key=lambda t: abs(t - default))
        extra = [(f"utils_cv {label_g} (groups)", f"{t_g:.2f}", grouped_g[t_g], enc_g),
                 (f"utils_cv {label_g} (groups)", f"{best_g:.2f} (best)", grouped_g[best_g], enc_g)]

    print(f"Command: `{' '.join(shlex.quote(a) for a in ['python', 'benchmarks/bench_dedup.py', *sys.argv[1:]])}`\n")
    print(f"{n} files: {sum(r['role'] == 'source' for r in rows)} sources x {len(copies) // max(1, sum(r['role'] == 'source' for r in rows))} "
          f"edited copies, {sum(r['role'] == 'distractor' for r in rows)} distractors; {len(true_keys)} true pairs "
          f"of {n * (n - 1) // 2}. CPUs: {len(os.sched_getaffinity(0))}.\n")
    print("| method | threshold | precision | recall | F1 | encode s | search s |")
    print("|---|---|---|---|---|---|---|")
    rows_out = [(f"utils_cv {label} + pHash (groups)", f"{t_default:.2f} (default)", grouped[t_default], enc_s + ph_s),
                (f"utils_cv {label} + pHash (groups)", f"{best:.2f} (best)", grouped[best], enc_s + ph_s),
                (f"utils_cv {label} alone (groups)", f"{t_default:.2f}", emb_only[t_default], enc_s),
                (f"utils_cv {label} alone (groups)", f"{best_e:.2f} (best)", emb_only[best_e], enc_s),
                (f"utils_cv {label} alone, raw pairs", f"{t_default:.2f}", raw[t_default], enc_s),
                (f"utils_cv {label} alone, raw pairs", f"{best_raw:.2f} (best)", raw[best_raw], enc_s)]
    rows_out += extra
    for name, thr, (p, r, f1, s, _), e_s in rows_out:
        print(f"| {name} | {thr} | {p:.3f} | {r:.3f} | {f1:.3f} | {fmt(e_s, 1)} | {fmt(s, 2)} |")
    for name, h in hs.items():
        for t in sorted(h["timed"]):
            p, r, f1, s, _ = h["timed"][t]
            tag = ("default" if t == HASH_DEFAULT else "") + (", best" if t == h["best"] and t == HASH_DEFAULT
                                                              else "best" if t == h["best"] else "")
            print(f"| imagededup {name} | {t} ({tag}) | {p:.3f} | {r:.3f} | {f1:.3f} | {h['encode_s']:.1f} | {s:.2f} |")
    if hs:
        best_hash = max(hs, key=lambda k: hs[k]["timed"][hs[k]["best"]][2])
        bh = hs[best_hash]["timed"][hs[best_hash]["best"]]
        print(f"\nF1 at the default threshold minus the best hash's best F1 ({best_hash}): "
              f"{grouped[t_default][2] - bh[2]:+.3f}")
    shown = [t for t in grouped if abs(t * 20 - round(t * 20)) < 1e-6 and 0.3 <= t <= 0.8]
    print("\n| threshold | " + " | ".join(f"{t:.2f}" for t in shown) + " |\n" + "|---" * (len(shown) + 1) + "|")
    for k, what in enumerate(("precision", "recall", "F1")):
        print(f"| {what} (groups) | " + " | ".join(f"{grouped[t][k]:.3f}" for t in shown) + " |")
    print(f"\nCalibration: largest threshold with group precision >= {args.precision}: {fmt(calibrated, 2)} "
          f"(F1 {fmt(grouped[calibrated][2] if keep_p else float('nan'))}); best F1 at {best:.2f}.\n")

    cols = [f"utils_cv + pHash @ {t_default:.2f}", f"utils_cv + pHash @ {best:.2f}", f"embeddings alone @ {t_default:.2f}"]
    recalls = [edit_recall(grouped[t_default][4], copies, n), edit_recall(grouped[best][4], copies, n),
               edit_recall(emb_only[t_default][4], copies, n)]
    if hs:
        cols.append(f"{best_hash} @ {hs[best_hash]['best']}")
        recalls.append(edit_recall(bh[4], copies, n))
    print("| edit | " + " | ".join(cols) + " | distance to source: median | 95th pct | max |")
    print("|---" * (len(cols) + 4) + "|")
    for e in sorted({c[2] for c in copies}, key=[c[2] for c in copies].index):
        ds = np.array([np.linalg.norm(x[s] - x[c]) for s, c, k in copies if k == e])
        print(f"| {e} | " + " | ".join(f"{rc[e]:.3f}" for rc in recalls)
              + f" | {np.median(ds):.3f} | {np.percentile(ds, 95):.3f} | {ds.max():.3f} |")
    src = np.array(sorted({s for s, _, _ in copies}))
    other = np.array([r["role"] != "copy" for r in rows])
    xs = x[other]
    dd = np.sqrt(np.maximum(2 - 2 * (xs @ xs.T), 0))
    np.fill_diagonal(dd, np.inf)
    nearest = dd.min(1)
    print(f"\nDistinct images (sources and distractors, {len(xs)}): distance to the nearest other one: "
          f"min {nearest.min():.3f}, 1st pct {np.percentile(nearest, 1):.3f}, median {np.median(nearest):.3f} "
          f"({len(src)} sources).\n")

    if args.timing_n:
        seconds, cpu, ngroups, nitems = synthetic_timing(args.timing_n, default)
        load = os.getloadavg()[0]
        print(f"| task | items | threshold | groups | seconds (median of 3) | CPU seconds, all threads |\n"
              f"|---|---|---|---|---|---|\n"
              f"| find_duplicates, features and hashes given (synthetic clustered, dim 1280) | {args.timing_n} | "
              f"{default:.2f} | {ngroups} ({nitems} items) | {seconds:.2f} | {cpu:.2f} |\n\n"
              f"Load average during the run: {load:.1f} on {len(os.sched_getaffinity(0))} CPUs.")


if __name__ == "__main__":
    main()
