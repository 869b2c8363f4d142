"""Command line: ``python -m utils_cv.similarity demo``.

The demo embeds the default data set (or ``--data DIR``) with the default backbone, finds
the nearest neighbours of a few query images, prints a table and saves a figure under
``outputs/``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("utils_cv.similarity")


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    from utils_cv.common.paths import atomic_write
    from utils_cv.similarity import data, features, index, metrics, model, plot

    root = Path(args.data) if args.data else data.default_dataset()
    paths, labels = data.list_images(root)
    labels_arr = np.asarray(labels)
    print(f"data: {root} ({len(paths)} images, {len(set(labels))} classes)")
    net, transform = model.create_backbone(args.backbone, image_size=args.image_size)
    print(f"backbone: {args.backbone} ({net.feature_dim}-d features)")
    feats = features.extract_features(net, paths, transform, batch_size=args.batch_size, progress=not args.no_progress)
    k = min(args.k, len(paths) - 1)
    D, I = index.knn(feats, feats, k=k, exclude_self=True)

    same = labels_arr[I] == labels_arr[:, None]
    print(f"\nleave-one-out over {len(paths)} images: top-1 neighbour of the same class "
          f"{same[:, 0].mean():.3f}, share of the top-{k} of the same class {same.mean():.3f}\n")
    print(_evaluation_table(feats, labels, args.negatives, args.seed, metrics, data) + "\n")

    rng = np.random.default_rng(args.seed)
    classes = sorted(set(labels))
    picked = [int(rng.choice(np.nonzero(labels_arr == c)[0])) for c in rng.permutation(classes)[: args.queries]]
    header = f"{'query':40s} " + "  ".join(f"{'#' + str(j + 1):>22s}" for j in range(k))
    print(header)
    for q in picked:
        cells = [f"{labels[i][:14]:>14s} {d:.3f}{'*' if labels[i] == labels[q] else ' '}" for i, d in zip(I[q], D[q])]
        name = f"{labels[q]}/{Path(paths[q]).name}"[:40]
        print(f"{name:40s} " + "  ".join(f"{c:>22s}" for c in cells))
    print("(* = same class as the query; numbers are L2 distances between normalised features)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(picked), 1, figsize=(1.7 * (k + 1), 2.3 * len(picked)))
    for ax, q in zip(np.atleast_1d(axes), picked):
        plot.plot_neighbors(paths[q], [paths[i] for i in I[q]], D[q], labels[q], [labels[i] for i in I[q]], ax=ax)
    fig.suptitle(f"{args.backbone}: nearest neighbours by L2 distance")
    fig.tight_layout()
    out = Path(args.output) / "demo_neighbors.png"
    with atomic_write(out) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    print(f"\nfigure: {out}")
    return 0


def _evaluation_table(feats, labels, num_negatives, seed, metrics, data) -> str:
    import numpy as np

    scores = metrics.evaluate_retrieval(feats, labels)
    lines = ["evaluation (leave-one-out: every image a query against all others)",
             "| metric | value |", "|---|---:|"]
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "map"):
        lines.append(f"| {key} | {scores[key]:.3f} |")
    counts = {c: labels.count(c) for c in set(labels)}
    n_neg = min(num_negatives, len(labels) - max(counts.values()))
    if min(counts.values()) >= 2 and n_neg >= 1:
        ranks = metrics.positive_ranks(feats, data.comparative_sets(labels, num_negatives=n_neg, seed=seed))
        lines.append(f"| median rank, comparative sets (1 positive, {n_neg} negatives) | {np.median(ranks):g} |")
        lines.append(f"| recall@1, comparative sets | {metrics.recall_at_k(ranks, 1):.3f} |")
    if scores["num_excluded"]:
        lines.append(f"({scores['num_excluded']} queries without another image of their class left out)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m utils_cv.similarity", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="nearest neighbours on the default data set with the default backbone")
    demo.add_argument("--data", help="image folder, one sub-folder per class (default: the shipped data set)")
    demo.add_argument("--backbone", default="efficientnet_lite0")
    demo.add_argument("--image-size", type=int, default=None, help="input side in pixels (default: the model's)")
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--k", type=int, default=5, help="neighbours per query")
    demo.add_argument("--queries", type=int, default=4, help="query images shown (one per class)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--negatives", type=int, default=99, help="negatives per comparative set")
    demo.add_argument("--output", default="outputs", help="folder for the figure")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("utils_cv").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
