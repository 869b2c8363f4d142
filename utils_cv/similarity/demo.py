"""The demo, the main job (``make demo``, ``utils-cv-similarity demo``).

It splits the default data set (or ``--data DIR``) 80/20 by image, measures retrieval on the
test images with ImageNet features, fine-tunes the default backbone on the training images,
measures again, saves the model under ``outputs/`` and shows the nearest neighbours of a few
test images (a table, and a figure in ``outputs/``). ``--epochs 0`` skips training: ImageNet
features, leave-one-out over all images. Its output is a report for people: it prints.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from utils_cv.similarity._checks import positive_int_text

logger = logging.getLogger("utils_cv.similarity")


def run(args: argparse.Namespace) -> int:
    from utils_cv.similarity import data, features, index, metrics, model

    root = Path(args.data) if args.data else data.default_dataset()
    paths, labels = data.list_images(root)
    print(f"data: {root} ({len(paths)} images, {len(set(labels))} classes)")
    progress = not args.no_progress and sys.stderr.isatty()
    if args.epochs is not None and args.epochs <= 0 and args.image_size is not None:
        raise ValueError("--image-size applies to fine-tuning; with --epochs 0 the backbone's own input size is used.")
    imagenet, imagenet_tf = model.create_backbone(args.backbone)
    title = f"{args.backbone}, ImageNet weights"
    from utils_cv.similarity.heads import recipe

    settings = recipe(args.head)  # what the options left out come from
    image_size = args.image_size or settings["image_size"]
    epochs = settings["epochs"] if args.epochs is None else args.epochs
    freeze_epochs = settings["freeze_epochs"] if args.freeze_epochs is None else args.freeze_epochs
    if epochs > 0:
        from utils_cv.similarity import train

        tr, te = data.split_by_image(paths, labels, test_size=0.2, seed=args.seed)
        p_tr, l_tr = [paths[i] for i in tr], [labels[i] for i in tr]
        p_te, l_te = [paths[i] for i in te], [labels[i] for i in te]
        print(f"split: {len(tr)} training / {len(te)} test images (stratified by class, seed {args.seed})")
        before = metrics.evaluate_retrieval(
            features.extract_features(imagenet, p_te, imagenet_tf, progress=False), l_te)
        print(f"fine-tuning {args.backbone} with a {args.head} head at {image_size} px: "
              f"{freeze_epochs} frozen + {epochs} epochs")
        learn = train.create_learner(p_tr, l_tr, backbone=args.backbone, head=args.head, image_size=image_size,
                                     seed=args.seed)
        log = train.fine_tune(learn, epochs, freeze_epochs=freeze_epochs, progress=progress)
        net, transform = train.embedding_model(learn)
        after = metrics.evaluate_retrieval(features.extract_features(net, p_te, transform, progress=False), l_te)
        print("\nper epoch (0 = before training): validation MAP@R on 20 % of the training images")
        print("  " + "  ".join(f"{e['epoch']}: {e.get('map@r', float('nan')):.3f}" for e in log))
        print(f"\ntest images as queries and gallery (leave-one-out), {len(te)} images")
        print("| features | recall@1 | recall@2 | recall@4 | recall@8 | MAP@R | mAP |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, r in ((f"ImageNet (no training, {_crop_size(imagenet_tf)} px)", before),
                        (f"fine-tuned {args.head} ({image_size} px)", after)):
            print(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in
                                              ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "map")) + " |")
        _save_training_plot(log, Path(args.output) / "training_log.png")
        saved = train.save(learn, Path(args.output) / "model.pth")
        print(f"\nmodel: {saved} (+ .json); load it with utils_cv.similarity.train.load")
        title = f"{args.backbone}, fine-tuned ({args.head})"
        queries = [int(i) for i in te]
    else:
        net, transform = imagenet, imagenet_tf
        queries = list(range(len(paths)))
    feats = features.extract_features(net, paths, transform, batch_size=args.batch_size, progress=progress)
    if epochs <= 0:
        print("\n" + _evaluation_table(feats, labels, args.negatives, args.seed))
    k = min(args.k, len(paths) - 1)
    D, I = index.knn(feats, feats, k=k, exclude_self=True)
    _show_neighbours(args, paths, labels, queries, D, I, k, title)
    return 0


def _save_training_plot(log, out: Path) -> None:
    import matplotlib.pyplot as plt

    from utils_cv.similarity import plot

    fig, ax = plt.subplots(figsize=(6, 3.5))
    plot.plot_training_log(log, ax=ax)
    fig.tight_layout()
    plot.save_figure(fig, out)
    print(f"training curve: {out}")


def _crop_size(transform) -> str:
    for t in getattr(transform, "transforms", []):
        if type(t).__name__ == "CenterCrop":
            return str(t.size[0])
    return "?"


def _show_neighbours(args, paths, labels, queries, D, I, k, title) -> None:
    import numpy as np

    from utils_cv.similarity import plot

    labels_arr = np.asarray(labels)
    rng = np.random.default_rng(args.seed)
    q_labels = labels_arr[queries]
    picked = [int(rng.choice(np.asarray(queries)[q_labels == c]))
              for c in rng.permutation(sorted(set(q_labels.tolist())))[: args.queries]]
    print(f"\nnearest neighbours among all {len(paths)} images")
    print(f"{'query':40s} " + "  ".join(f"{'#' + str(j + 1):>22s}" for j in range(k)))
    for q in picked:
        cells = [f"{labels[i][:14]:>14s} {d:.3f}{'*' if labels[i] == labels[q] else ' '}" for i, d in zip(I[q], D[q])]
        name = f"{labels[q]}/{Path(paths[q]).name}"[:40]
        print(f"{name:40s} " + "  ".join(f"{c:>22s}" for c in cells))
    print("(* = same class as the query; numbers are L2 distances between normalised features)")

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(picked), 1, figsize=(1.7 * (k + 1), 2.3 * len(picked)))
    for ax, q in zip(np.atleast_1d(axes), picked):
        plot.plot_neighbors(paths[q], [paths[i] for i in I[q]], D[q], labels[q], [labels[i] for i in I[q]], ax=ax)
    fig.suptitle(f"{title}: nearest neighbours by L2 distance")
    fig.tight_layout()
    out = plot.save_figure(fig, Path(args.output) / "demo_neighbors.png")
    print(f"\nfigure: {out}")


def _evaluation_table(feats, labels, num_negatives, seed) -> str:
    import numpy as np

    from utils_cv.similarity import data, metrics

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (shared by the console script and ``python -m``)."""
    parser.add_argument("--data", help="image folder, one sub-folder per class (default: the shipped data set)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=positive_int_text, default=None,
                        help="training and embedding input side in pixels (default 160)")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs after the frozen ones (0: no training; "
                                                  "default: the head's recipe, 8)")
    parser.add_argument("--freeze-epochs", type=int, help="epochs training only the head first (default: the "
                                                         "head's recipe, 2 for softmax, 3 for NormSoftmax)")
    parser.add_argument("--head", default="softmax", choices=["softmax", "normsoftmax"])
    parser.add_argument("--batch-size", type=positive_int_text, default=32)
    parser.add_argument("--k", type=positive_int_text, default=5, help="neighbours per query")
    parser.add_argument("--queries", type=positive_int_text, default=4, help="query images shown (one per class)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--negatives", type=positive_int_text, default=99, help="negatives per comparative set")
    parser.add_argument("--output", default="outputs", help="folder for the figure")
