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
they are the gallery), both, and k-reciprocal re-ranking (k1 20, k2 6, lambda 0.3) on top.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from utils_cv.similarity import boosts, data, features, metrics, model, rerank
from utils_cv.similarity.whitening import PCAWhitening, database_augmentation

KEYS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")


def _same():
    paths, labels = data.list_images(data.default_dataset())
    _, te = data.split_by_image(paths, labels, test_size=0.2, seed=0)
    return "same classes, default data set", [paths[i] for i in te], [labels[i] for i in te]


def _disjoint():
    from build_openclipart import default_location

    root = default_location()
    manifest = json.loads((root / "MANIFEST.json").read_text())
    paths, labels = data.list_images(root)
    train = set(manifest["classes_train"])
    keep = [i for i, label in enumerate(labels) if label not in train]
    return "disjoint classes, openclipart", [paths[i] for i in keep], [labels[i] for i in keep]


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
    rows[f"{base} + DBA"] = metrics.evaluate_retrieval(database_augmentation(x, k=dba_k, alpha=dba_alpha), labels)
    both = database_augmentation(white, k=dba_k, alpha=dba_alpha)
    rows[f"{base} + whitening + DBA"] = metrics.evaluate_retrieval(both, labels)
    for label, f in ((base, x), (f"{base} + whitening + DBA", both)):
        d = rerank.k_reciprocal_rerank(f, None, k1=20, k2=6, lambda_value=0.3)
        rows[f"{label} + re-ranking"] = metrics.evaluate_distances(d, labels)
    plain = rows["plain"]["map@r"]
    print(f"\n{name}: {len(paths)} images, leave-one-out; base of the post-processing rows: {base}\n")
    print("| features | " + " | ".join(KEYS) + " | MAP@R vs plain | extraction (s) |")
    print("|---|" + "---:|" * (len(KEYS) + 2))
    for label, r in rows.items():
        extra = f"{seconds[label]:.0f}" if label in seconds else ""
        print(f"| {label} | " + " | ".join(f"{r[k]:.3f}" for k in KEYS) + f" | {r['map@r'] - plain:+.3f} | {extra} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--protocol", choices=["same", "disjoint", "both"], default="both")
    parser.add_argument("--whiten-power", type=float, default=0.5)
    parser.add_argument("--dba-k", type=int, default=2)
    parser.add_argument("--dba-alpha", type=float, default=3.0)
    args = parser.parse_args()
    print("$ .venv/bin/python benchmarks/bench_training_free.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()))
    for make in ((_same,) if args.protocol == "same" else (_disjoint,) if args.protocol == "disjoint"
                 else (_same, _disjoint)):
        run(*make(), args.whiten_power, args.dba_k, args.dba_alpha)


if __name__ == "__main__":
    main()
