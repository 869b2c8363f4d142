"""Training-free improvements of ImageNet features, on the README's two protocols.

    .venv/bin/python benchmarks/bench_training_free.py [--protocol same|disjoint|both]

No label is used by any method; labels only score the result. Each protocol's test images are
queries and gallery (leave-one-out), as in bench_training_quality.py:

* same: the 92 test images of the default data set (80/20 split by image, seed 0);
* disjoint: the 2,262 images of the 18 test classes of the openclipart benchmark
  (``benchmarks/build_openclipart.py`` builds it).

Rows (EfficientNet-Lite0, ImageNet weights, 224 px): plain features; horizontal-flip TTA; GeM
pooling (p = 3); both; then on the best of those: PCA whitening fitted on the gallery itself
(``whitening.PCAWhitening``), alpha-DBA (k 2, alpha 3: every vector, queries included, since
they are the gallery), both, alpha-QE (each query expanded with its 2 nearest other images,
alpha 3, then searched against the gallery as it is, and against the alpha-DBA gallery), and
k-reciprocal re-ranking (k1 20, k2 6, lambda 0.3) on top; then
diffusion on the mutual-neighbour graph (``diffusion.diffusion_distances``: alpha 0.99, gamma 3,
5 seed neighbours per query, the graph's k sized by ``diffusion.default_k``) on the plain features
and on the best, and on the plain features with k fixed at 10, 20 and 50 for comparison. Seconds:
the extraction for the feature rows, diffusion alone for its rows.

``--selection``: instead, diffusion's grid (k 5-50, alpha 0.9 / 0.99) on the training images of
both protocols (the default data set's 374, openclipart's 1,606 in its 17 training classes),
images the rows above never score: how ``diffusion.default_k`` was chosen.

``--scale``: instead, diffusion's seconds on synthetic 128-d features in classes of 100 (2,000 to
32,000 images): building the graph, 100 new queries (the first call on the graph), and every
image against the others (leave-one-out, up to 8,000).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from utils_cv.similarity import boosts, data, features, metrics, model, rerank
from utils_cv.similarity.diffusion import default_k, diffusion_distances
from utils_cv.similarity.distances import pairwise_distances
from utils_cv.similarity.whitening import PCAWhitening, database_augmentation, query_expansion

KEYS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")


def _same(train: bool = False):
    """The default data set's test images (or, ``train``, its training images), split as in
    bench_training_quality.py."""
    paths, labels = data.list_images(data.default_dataset())
    idx = data.split_by_image(paths, labels, test_size=0.2, seed=0)[0 if train else 1]
    name = "default data set, training images" if train else "same classes, default data set"
    return name, [paths[i] for i in idx], [labels[i] for i in idx]


def _disjoint(train: bool = False):
    """openclipart's test classes (or, ``train``, its training classes)."""
    from build_openclipart import default_location

    root = default_location()
    classes_train = set(json.loads((root / "MANIFEST.json").read_text())["classes_train"])
    paths, labels = data.list_images(root)
    keep = [i for i, label in enumerate(labels) if (label in classes_train) == train]
    name = "openclipart, training classes" if train else "disjoint classes, openclipart"
    return name, [paths[i] for i in keep], [labels[i] for i in keep]


def selection(protocols) -> None:
    net, tf = model.create_backbone()
    ks, alphas = (5, 10, 20, 30, 50), (0.9, 0.99)
    for protocol in protocols:
        name, paths, labels = (_same if protocol == "same" else _disjoint)(train=True)
        x = features.extract_features(net, paths, tf, progress=False)
        plain = metrics.evaluate_retrieval(x, labels)["map@r"]
        print(f"\n{name}: {len(paths)} images, plain MAP@R {plain:.3f}; MAP@R change with diffusion "
              f"(default_k: {default_k(len(paths))})\n")
        print("| alpha | " + " | ".join(f"k {k}" for k in ks) + " |")
        print("|---|" + "---:|" * len(ks))
        for alpha in alphas:
            gains = [metrics.evaluate_distances(diffusion_distances(x, k=k, alpha=alpha), labels)["map@r"] - plain
                     for k in ks]
            print(f"| {alpha} | " + " | ".join(f"{g:+.3f}" for g in gains) + " |", flush=True)


def scale() -> None:
    from utils_cv.similarity.diffusion import DiffusionGraph

    rng = np.random.default_rng(0)
    print("\n| images | k | graph (s) | leave-one-out (s) | 100 queries (s) |\n|---:|---:|---:|---:|---:|")
    for n in (2_000, 4_000, 8_000, 16_000, 32_000):
        centres = rng.normal(size=(n // 100, 128))
        x = (centres[rng.integers(0, len(centres), n)] + 0.8 * rng.normal(size=(n, 128))).astype(np.float32)
        queries = (x[:100] + 0.01 * rng.normal(size=(100, 128))).astype(np.float32)
        t = time.perf_counter()
        graph = DiffusionGraph(x)
        built = time.perf_counter() - t
        t = time.perf_counter()
        graph.distances(queries)  # the first call: up to 4,096 images it also inverts the system
        asked = time.perf_counter() - t
        loo = ""
        if n <= 8_000:
            t = time.perf_counter()
            graph.distances()
            loo = f"{time.perf_counter() - t:.1f}"
        print(f"| {n:,} | {graph.k} | {built:.1f} | {loo} | {asked:.1f} |", flush=True)


def run(name, paths, labels, whiten_power: float, dba_k: int, dba_alpha: float) -> None:
    net, tf = model.create_backbone()
    models = {"plain": net, "flip TTA": boosts.flip_model(net), "GeM p=3": boosts.gem_model(net, p=3),
              "flip TTA + GeM": boosts.flip_model(boosts.gem_model(net, p=3))}
    rows, feats, seconds = {}, {}, {}
    for label, m in models.items():
        t = time.perf_counter()
        feats[label] = features.extract_features(m, paths, tf, progress=False)
        seconds[label] = time.perf_counter() - t
        rows[label] = metrics.evaluate_retrieval(feats[label], labels)
    base = max(models, key=lambda k: rows[k]["map@r"])
    x = feats[base]
    white = PCAWhitening.fit(x, power=whiten_power)(x)
    rows[f"{base} + whitening"] = metrics.evaluate_retrieval(white, labels)
    dba = database_augmentation(x, k=dba_k, alpha=dba_alpha)
    rows[f"{base} + DBA"] = metrics.evaluate_retrieval(dba, labels)
    both = database_augmentation(white, k=dba_k, alpha=dba_alpha)
    rows[f"{base} + whitening + DBA"] = metrics.evaluate_retrieval(both, labels)
    for label, g in ((f"{base} + QE", x), (f"{base} + DBA + QE", dba)):  # expanded queries against the gallery
        q = query_expansion(g, g, k=dba_k, alpha=dba_alpha, exclude_self=True)
        rows[label] = metrics.evaluate_distances(pairwise_distances(q, g), labels)
    for label, f in ((base, x), (f"{base} + whitening + DBA", both)):
        d = rerank.k_reciprocal_rerank(f, None, k1=20, k2=6, lambda_value=0.3)
        rows[f"{label} + re-ranking"] = metrics.evaluate_distances(d, labels)
    for label in dict.fromkeys(("plain", base)):
        t = time.perf_counter()
        d = diffusion_distances(feats[label])
        seconds[f"{label} + diffusion (k {default_k(len(paths))})"] = time.perf_counter() - t
        rows[f"{label} + diffusion (k {default_k(len(paths))})"] = metrics.evaluate_distances(d, labels)
    for k in (10, 20, 50):
        if k < len(paths) and k != default_k(len(paths)):
            rows[f"plain + diffusion, k {k}"] = metrics.evaluate_distances(diffusion_distances(feats["plain"], k=k), labels)
    plain = rows["plain"]["map@r"]
    print(f"\n{name}: {len(paths)} images, leave-one-out; base of the post-processing rows: {base}\n")
    print("| features | " + " | ".join(KEYS) + " | MAP@R vs plain | seconds |")
    print("|---|" + "---:|" * (len(KEYS) + 2))
    for label, r in rows.items():
        extra = f"{seconds[label]:.1f}" if label in seconds else ""
        print(f"| {label} | " + " | ".join(f"{r[k]:.3f}" for k in KEYS) + f" | {r['map@r'] - plain:+.3f} | {extra} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--protocol", choices=["same", "disjoint", "both"], default="both")
    parser.add_argument("--whiten-power", type=float, default=0.5)
    parser.add_argument("--dba-k", type=int, default=2)
    parser.add_argument("--dba-alpha", type=float, default=3.0)
    parser.add_argument("--selection", action="store_true", help="diffusion's grid on the training images instead")
    parser.add_argument("--scale", action="store_true", help="diffusion's seconds on synthetic features instead")
    args = parser.parse_args()
    print("$ .venv/bin/python benchmarks/bench_training_free.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f" {v}") for k, v in vars(args).items()
        if v is not False))
    if args.scale:
        scale()
        return
    if args.selection:
        selection(["same", "disjoint"] if args.protocol == "both" else [args.protocol])
        return
    for make in ((_same,) if args.protocol == "same" else (_disjoint,) if args.protocol == "disjoint"
                 else (_same, _disjoint)):
        run(*make(), args.whiten_power, args.dba_k, args.dba_alpha)


if __name__ == "__main__":
    main()
