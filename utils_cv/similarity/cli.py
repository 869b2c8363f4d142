"""The command line: ``utils-cv-similarity`` (also ``python -m utils_cv.similarity``).

Subcommands, each a function taking the parsed arguments (``set_defaults(func=...)``):

* ``index FOLDER --out DIR``: embed a folder of images (plain or one sub-folder per class)
  into a searchable collection; a re-run embeds only new or changed files.
* ``query DIR IMAGE...``: the nearest images of each query image, with paths and distances.
* ``duplicates FOLDER|DIR``: exact and near-duplicate groups, the files one could remove (kept).
* ``serve DIR``: a browser app over a collection (search by upload or webcam, duplicates).
* ``train FOLDER --out model.pth``: fine-tune a backbone on a labelled folder.
* ``evaluate FOLDER``: retrieval metrics of a model on a labelled folder, with 95 % intervals.
* ``demo``: the main job on the default data set (see :mod:`utils_cv.similarity.demo`).

Exit codes: 0 done, 1 bad input (the message names the file or parameter and what to do),
2 usage error (argparse). Tables and JSON go to standard output, logs and progress bars to
standard error; progress bars only on a terminal.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from utils_cv.similarity._checks import positive_int_text
from utils_cv.similarity.cli_examples import EXAMPLES

logger = logging.getLogger("utils_cv.similarity.cli")


class UsageError(ValueError):
    """Arguments that contradict each other (exit code 2)."""


def _shown(path) -> str:
    """A path as text that any terminal or figure can show (undecodable bytes escaped)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _progress(args) -> bool:
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


# ---------------------------------------------------------------------------- index / query
def cmd_index(args) -> int:
    from utils_cv.similarity import collection

    if args.model and (args.backbone or args.weights):
        raise UsageError("--model (a trained model file) and --backbone / --weights exclude each other.")
    if args.address and args.engine != "ray":
        raise UsageError("--address needs --engine ray.")
    if args.engine == "ray":
        from utils_cv.similarity import scale

        if (args.runtime, args.precision) != ("torch", "fp32"):
            raise UsageError("--runtime and --precision apply to --engine local (Ray workers run torch).")
        report = scale.index_folder_ray(args.folder, args.out, model=args.model, backbone=args.backbone,
                                        weights=args.weights, backend=args.backend, batch_size=args.batch_size,
                                        address=args.address, progress=_progress(args))
    else:
        report = collection.index_folder(args.folder, args.out, model=args.model, backbone=args.backbone,
                                         weights=args.weights, backend=args.backend, batch_size=args.batch_size,
                                         progress=_progress(args), runtime=args.runtime, precision=args.precision)
    if args.export:
        collection.export_parquet(collection.open_collection(args.out), args.export)
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
        return 0
    print(f"{report.total} images indexed in {_shown(report.out)} ({report.backend} backend): {report.embedded} "
          f"embedded, {report.reused} unchanged, {report.removed} removed, {len(report.skipped)} skipped "
          f"({report.seconds:.1f} s)")
    for path, reason in report.skipped:
        print(f"  skipped {_shown(path)}: {reason}")
    if args.export:
        print(f"embeddings: {_shown(args.export)}")
    return 0


def cmd_query(args) -> int:
    from utils_cv.similarity import collection
    from utils_cv.similarity.features import FeatureExtractor

    col = collection.open_collection(args.index)
    k = min(args.k, len(col.index))
    module, transform = collection.load_embedder(col.model)
    result = FeatureExtractor(module, transform).extract([Path(p) for p in args.images], on_error="skip",
                                                          progress=False)
    for item, reason in result.skipped:
        logger.warning("query image %s skipped: %s", _shown(item), reason)
    if len(result.kept) == 0:
        raise ValueError("None of the query images could be read; see the messages above.")
    D, ids = col.index.search(result.features, k)
    answers = []
    for row, j in enumerate(result.kept):
        hits = [{"path": str(col.abspath(i)), "distance": round(float(d), 6)} for d, i in zip(D[row], ids[row])
                if i is not None and (args.max_distance is None or d <= args.max_distance)]
        answers.append({"query": str(args.images[int(j)]), "neighbours": hits})
    if args.json:
        print(json.dumps({"k": k, "queries": answers,
                          "skipped": [{"path": str(p), "reason": r} for p, r in result.skipped]}, indent=1))
    else:
        for a in answers:
            print(f"{_shown(a['query'])}")
            for rank, hit in enumerate(a["neighbours"], 1):
                print(f"  {rank:3d}  {hit['distance']:.4f}  {_shown(hit['path'])}")
    if args.figure:
        from utils_cv.similarity import plot

        fig = plot.plot_search_results([a["query"] for a in answers], [[h["path"] for h in a["neighbours"]]
                                       for a in answers], [[h["distance"] for h in a["neighbours"]] for a in answers])
        plot.save_figure(fig, args.figure)
        if not args.json:
            print(f"figure: {_shown(args.figure)}")
    return 0


def cmd_duplicates(args) -> int:
    import csv
    import hashlib

    from utils_cv.common.paths import cache_dir
    from utils_cv.similarity import collection, dedup

    target = Path(args.target).expanduser()
    if (target / "collection.json").is_file():
        col_dir = target
    else:  # a folder of images: its collection lives in the cache, so re-runs embed only changes
        if not target.is_dir():
            raise FileNotFoundError(f"{_shown(target)} is neither an image folder nor a collection from 'index'.")
        key = hashlib.sha256(str(target.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:16]
        col_dir = Path(args.index) if args.index else cache_dir("collections", key)
        collection.index_folder(target, col_dir, model=args.model, backbone=args.backbone, weights=args.weights,
                                batch_size=args.batch_size, progress=_progress(args), runtime=args.runtime,
                                precision=args.precision)
    col = collection.open_collection(col_dir)
    groups = col.duplicate_groups(args.threshold, args.hash_threshold)
    for g in groups:
        g.ids = [col.abspath(i) for i in g.ids]
    remove = dedup.duplicates_to_remove(groups, keep=args.keep)
    if args.json:
        print(json.dumps({"threshold": args.threshold if args.threshold is not None else dedup.DEFAULT_THRESHOLD,
                          "groups": [[{"path": str(p), "distance": round(float(d), 6)} for p, d in zip(g.ids, g.distances)]
                                     for g in groups],
                          "exact": [g.exact for g in groups], "remove": [str(p) for p in remove]}, indent=1))
    elif args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["group", "path", "distance", "exact", "suggest_remove"])
        marked = set(remove)
        for n, g in enumerate(groups, 1):
            for p, d in zip(g.ids, g.distances):
                writer.writerow([n, _shown(p), f"{d:.6f}", int(g.exact), int(p in marked)])
    else:
        marked = set(remove)
        print(f"{len(groups)} group(s) of duplicates among {len(col.entries)} images; {len(remove)} file(s) could "
              f"be removed (keeping the {args.keep} of each group). Nothing was deleted.")
        for n, g in enumerate(groups, 1):
            print(f"group {n}{' (identical files)' if g.exact else ''}:")
            for p, d in zip(g.ids, g.distances):
                print(f"  {d:.4f}  {_shown(p)}{'  <- remove?' if p in marked else ''}")
    if args.figure and groups:
        from utils_cv.similarity import plot

        fig = plot.plot_duplicate_groups(groups, remove=remove)[0].figure
        fig.tight_layout()
        plot.save_figure(fig, args.figure)
    return 0


# ---------------------------------------------------------------------------- train / evaluate
def _labelled(folder):
    from utils_cv.similarity import data

    paths, labels = data.list_images(folder)
    if labels is None:
        raise ValueError(f"{_shown(folder)} has no class sub-folders: training and evaluation need labels. Lay it "
                         "out as FOLDER/<class name>/<image> (one sub-folder per class).")
    counts = {c: labels.count(c) for c in set(labels)}
    if len(counts) < 2:
        raise ValueError(f"{_shown(folder)} holds a single class ({next(iter(counts))!r}): every image is relevant to "
                         "every query and each metric would be 1.0. Lay it out as FOLDER/<class name>/<image>, one sub-folder "
                         "per class, with at least two classes.")
    single = sorted(c for c, n in counts.items() if n == 1)
    if single:
        logger.warning("%d class(es) with a single image (%s): they cannot be queries (no other image of their "
                       "class) and only act as distractors", len(single), ", ".join(single[:5]))
    return paths, labels


def cmd_train(args) -> int:
    from utils_cv.similarity import checkpoint, robust, splits, train

    paths, labels, valid = *_labelled(args.folder), 0.2
    if args.valid_classes:  # held-out classes validate: for a model that will search other classes
        if len(set(labels)) < 4:
            raise ValueError(f"--valid-classes holds out 2 or more classes and trains on the others: "
                             f"{_shown(args.folder)} has {len(set(labels))} classes, at least 4 are needed.")
        tr, va = splits.split_by_class(paths, labels, max(2, round(0.2 * len(set(labels)))), seed=args.seed)
        (paths, labels), valid = ([[xs[i] for i in tr] for xs in (paths, labels)],
                                  tuple([xs[i] for i in va] for xs in (paths, labels)))
    learner = train.create_learner(paths, labels, backbone=args.backbone, head=args.head, loss=args.loss,
                                   valid=valid, image_size=args.image_size, seed=args.seed, batch_size=args.batch_size)
    if args.class_scores:  # what would refuse them after training refuses them before
        robust.check_class_scores(learner)
    result = train.fine_tune(learner, args.epochs, freeze_epochs=args.freeze_epochs, lr=args.lr,
                             progress=_progress(args))
    scores = robust.class_scores(learner).weight if args.class_scores else 0.0  # before the ensemble
    mix = robust.output_ensemble(learner).weight if args.ensemble else 0.0
    saved, config = checkpoint.save(learner, args.out), learner.model.config
    print(f"model: {_shown(saved)} ({config['backbone']}, {args.head} head{', ' + args.loss if args.loss else ''}, "
          f"{config['image_size']} px; best "
          f"validation epoch {result.best_epoch} of {len(result.log) - 1}, {result.seconds:.0f} s"
          + (f"; class scores at weight {scores:.1f}" if args.class_scores else "")
          + (f"; starting features kept at weight {mix:.1f}" if args.ensemble else "") + ")")
    return 0


def cmd_evaluate(args) -> int:
    from utils_cv.similarity import collection, metrics
    from utils_cv.similarity.features import FeatureExtractor

    paths, labels = _labelled(args.folder)
    spec = collection.model_spec(args.model, args.backbone if not args.model else None, args.weights)
    module, transform = collection.load_embedder(spec)
    result = FeatureExtractor(module, transform, batch_size=args.batch_size).extract(
        paths, on_error="skip", progress=_progress(args))
    kept_labels = [labels[int(i)] for i in result.kept]
    per_query = metrics.per_query_metrics(result.features, kept_labels)
    keys = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "map")
    rows = {}
    for key in keys:
        lo, hi = metrics.bootstrap_interval(per_query[key], n_boot=args.bootstrap, seed=args.seed)
        rows[key] = {"value": float(per_query[key].mean()), "ci95": [lo, hi]}
    n = len(per_query["query"])
    if args.json:
        print(json.dumps({"model": spec, "images": len(kept_labels), "queries": n, "metrics": rows,
                          "skipped": [{"path": str(p), "reason": r} for p, r in result.skipped]}, indent=1))
        return 0
    print(f"{len(kept_labels)} images, {len(set(kept_labels))} classes; every image a query against all others "
          f"({n} queries); 95 % bootstrap intervals over queries")
    print("| metric | value | 95 % interval |\n|---|---:|---:|")
    for key, r in rows.items():
        print(f"| {key} | {r['value']:.3f} | {r['ci95'][0]:.3f} - {r['ci95'][1]:.3f} |")
    if n < 50:
        print(f"({n} queries: differences smaller than the intervals are noise)")
    return 0


# ---------------------------------------------------------------------------- parser
def _lazy(module: str, function: str):
    """A subcommand whose module (the app, the demo) is imported only when it runs."""
    return lambda args: getattr(importlib.import_module(f"utils_cv.similarity.{module}"), function)(args)


def build_parser() -> argparse.ArgumentParser:
    from utils_cv.similarity.demo import add_arguments as add_demo_arguments

    parser = argparse.ArgumentParser(prog="utils-cv-similarity", description="Image similarity: index a folder, "
                                     "find similar images, train and evaluate models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES.get(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--no-progress", action="store_true", help="no progress bars (they show only on a terminal)")
        return p

    def model_options(p, model_help):
        p.add_argument("--model", help=model_help)
        p.add_argument("--backbone", help="ImageNet backbone (default efficientnet_lite0; see "
                                          "'python -c \"from utils_cv.similarity import model; "
                                          "print(model.available_backbones())\"')")
        p.add_argument("--weights", help="a state dict file for --backbone (offline use)")
        p.add_argument("--batch-size", type=positive_int_text, default=32)

    def runtime_options(p):
        p.add_argument("--runtime", default="torch", choices=["torch", "onnx", "openvino"], help="where the model "
                       "runs: eager torch, ONNX Runtime or OpenVINO (CPU; extras 'onnx', 'openvino')")
        p.add_argument("--precision", default="fp32", choices=["fp32", "int8", "bf16"],
                       help="int8 with --runtime onnx, bf16 with openvino: faster, features slightly different")

    p = command("index", "embed a folder of images into a searchable collection (re-runs embed only changes)")
    p.add_argument("folder", help="image folder: plain, or one sub-folder per class")
    p.add_argument("--out", required=True, help="output folder of the collection")
    model_options(p, "a model file from 'train' (default: ImageNet features of --backbone)")
    runtime_options(p)
    p.add_argument("--backend", default="auto", choices=["auto", "exact", "hnsw", "ivfsq", "ivfpq"],
                   help="search structure; auto: exact up to 100k images, then hnsw, ivfsq above 1M")
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: this process; ray: Ray Data, resumable (the 'scale' extra)")
    p.add_argument("--address", help="with --engine ray: the Ray cluster ('auto', 'ray://head:10001'); default: a "
                                     "local one")
    p.add_argument("--export", help="also write path + embedding to this parquet file (needs pyarrow)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_index)

    p = command("query", "the most similar images of a collection for each query image")
    p.add_argument("index", help="a collection folder written by 'index'")
    p.add_argument("images", nargs="+", help="query image files")
    p.add_argument("-k", type=positive_int_text, default=10, help="neighbours per query (default 10)")
    p.add_argument("--max-distance", type=float, help="leave out neighbours farther than this")
    p.add_argument("--json", action="store_true", help="print JSON: queries, neighbours (path, distance)")
    p.add_argument("--figure", help="write a PNG of each query and its neighbours")
    p.set_defaults(func=cmd_query)

    p = command("duplicates", "exact and near-duplicate groups in a folder or collection (never deletes)")
    p.add_argument("target", help="an image folder, or a collection folder written by 'index'")
    model_options(p, "a model file from 'train' (default: ImageNet features of --backbone)")
    runtime_options(p)
    p.add_argument("--threshold", type=float, help="L2 distance under which two images are duplicates "
                                                   "(default: the calibrated value, see the FAQ)")
    from utils_cv.similarity.dedup import HASH_THRESHOLD  # numpy only

    p.add_argument("--hash-threshold", type=int, choices=range(-1, 65), metavar="BITS",
                   help=f"perceptual-hash bits (of 64) under which two images are duplicates too (default "
                        f"{HASH_THRESHOLD}; -1: embeddings alone)")
    p.add_argument("--keep", default="largest", choices=["largest", "first", "oldest"],
                   help="which file of each group to keep in the suggestion (default largest)")
    p.add_argument("--index", help="where to keep the embeddings of FOLDER (default: the user cache)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="groups (path, distance) and the files to remove")
    fmt.add_argument("--csv", action="store_true", help="one row per file: group, path, distance, exact, remove")
    p.add_argument("--figure", help="write a PNG of the largest groups")
    p.set_defaults(func=cmd_duplicates)

    p = command("serve", "a browser app over a collection: search by upload or webcam, browse duplicates")
    p.add_argument("index", help="a collection folder written by 'index'")
    p.add_argument("--model", help="the model file the collection was built with, if it moved since")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    p.add_argument("--port", type=positive_int_text, default=7860)
    p.add_argument("--max-upload-mb", type=float, default=20, help="largest upload in MB (default %(default)s)")
    p.set_defaults(func=_lazy("app", "run_serve"))

    p = command("train", "fine-tune a backbone for similarity on a labelled folder")
    p.add_argument("folder", help="labelled image folder: one sub-folder per class")
    p.add_argument("--out", required=True, help="model file to write (e.g. model.pth)")
    _train_options(p)
    p.set_defaults(func=cmd_train)

    p = command("evaluate", "retrieval metrics of a model on a labelled folder, with 95 %% intervals")
    p.add_argument("folder", help="labelled image folder: one sub-folder per class")
    model_options(p, "a model file from 'train' (default: ImageNet features of --backbone)")
    p.add_argument("--bootstrap", type=positive_int_text, default=2000, help="bootstrap draws for the intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = command("demo", "the main job: ImageNet vs fine-tuned retrieval on the default data set")
    add_demo_arguments(p)
    p.set_defaults(func=_lazy("demo", "run"))
    return parser


def _train_options(p) -> None:
    from utils_cv.similarity import model as model_mod
    from utils_cv.similarity.heads import HEADS, LOSSES, RECIPES

    recipe = RECIPES["softmax"]
    p.add_argument("--backbone", help=f"one of {model_mod.available_backbones()} or timm/<name> "
                                      f"(default: the recipe's, {recipe['backbone']})")
    p.add_argument("--head", default="softmax", choices=list(HEADS), help="default %(default)s; each head has its "
                   "own recipe (utils_cv.similarity.heads.RECIPES)")
    p.add_argument("--loss", choices=list(LOSSES), help="default: the head's own (metric: multisimilarity)")
    p.add_argument("--epochs", type=int, help=f"unfrozen epochs (softmax recipe: {recipe['epochs']})")
    p.add_argument("--freeze-epochs", type=int, help=f"head-only epochs first (softmax: {recipe['freeze_epochs']})")
    p.add_argument("--image-size", type=positive_int_text, help=f"input side, px (softmax: {recipe['image_size']})")
    p.add_argument("--lr", type=float, default=None, help="the head's learning rate (default: the recipe's)")
    p.add_argument("--batch-size", type=positive_int_text, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--valid-classes", action="store_true", help="validate on held-out classes (20 %%, at least 2) "
                   "instead of 20 %% of the images: for a model that will search classes it was not trained on")
    p.add_argument("--class-scores", action="store_true", help="mix the class scores into the embedding, weighted "
                   "by the validation (robust.class_scores): for searching the classes trained on")
    p.add_argument("--ensemble", action="store_true", help="keep the ImageNet network beside the fine-tuned one, "
                   "weighted by the validation (robust.output_ensemble; twice the embedding work)")


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    os.environ.setdefault("MPLBACKEND", "Agg")  # figures go to files, never to a window
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("utils_cv").setLevel(logging.INFO)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        parser.error(str(exc))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, ImportError, KeyError) as exc:
        print(f"error: {_shown(str(exc))}", file=sys.stderr)
        return 1
    return 0
