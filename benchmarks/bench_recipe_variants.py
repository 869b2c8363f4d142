"""The recipe choices behind ``heads.RECIPES``: head-only warm-up and batch-norm statistics.

    .venv/bin/python benchmarks/bench_recipe_variants.py [--variants A B C E N0 N3] [--seeds 0 1]

The same-class protocol of bench_training_quality.py (default data set split 80/20 by image,
seed 0; the 92 test images are queries and gallery); each variant fine-tunes with the given
seeds and prints the best epoch, its validation MAP@R and the test recall@1 / MAP@R.

* A: softmax, no warm-up, 8 epochs, batch-norm statistics frozen throughout (the recipe)
* B: as A, but the statistics adapt to the new images in the first epoch, then stay frozen
* C: softmax, 2 head-only epochs at 1e-2, then 8 (the warm-up is kept for the unfrozen phase)
* E: as C with 1 head-only epoch
* N0: NormSoftmax recipe without its 3 head-only epochs
* N3: NormSoftmax recipe
* L12, L16: as A with 12 or 16 epochs
* H: as A with the learning rates doubled (head 4e-3, body 8e-4)
* LS: as A with label smoothing 0.1
* MX: as A with mixup (fastai's ``MixUp``, alpha 0.4), 16 epochs
"""
from __future__ import annotations

import argparse
import time

from torch import nn

from utils_cv.common.versions import versions_line
from utils_cv.similarity import callbacks, data, features, metrics, train

VARIANTS = {
    "A": dict(head="softmax", freeze_epochs=0, adapt=False),
    "B": dict(head="softmax", freeze_epochs=0, adapt=True),
    "C": dict(head="softmax", freeze_epochs=2, adapt=False),
    "E": dict(head="softmax", freeze_epochs=1, adapt=False),
    "N0": dict(head="normsoftmax", freeze_epochs=0, adapt=False),
    "N3": dict(head="normsoftmax", freeze_epochs=None, adapt=False),
    "L12": dict(head="softmax", freeze_epochs=0, adapt=False, epochs=12),
    "L16": dict(head="softmax", freeze_epochs=0, adapt=False, epochs=16),
    "H": dict(head="softmax", freeze_epochs=0, adapt=False, lr=4e-3),
    "LS": dict(head="softmax", freeze_epochs=0, adapt=False, loss="smoothing"),
    "MX": dict(head="softmax", freeze_epochs=0, adapt=False, epochs=16, mixup=True),
}


def _loss(name):
    if name == "smoothing":
        from fastai.losses import LabelSmoothingCrossEntropyFlat

        return LabelSmoothingCrossEntropyFlat(eps=0.1)
    return None


class FirstEpochStats(callbacks.FrozenBatchNormStats):
    """Variant B: batch norms stay in train mode (statistics adapt) in the first epoch only."""

    def before_fit(self):
        self.epochs_seen = getattr(self, "epochs_seen", 0)

    def before_train(self):
        self.epochs_seen += 1
        if self.epochs_seen > 1:
            for m in self.learn.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    print(f"versions: {versions_line()}\n", flush=True)  # the same seed learns differently with other versions
    paths, labels = data.list_images(data.default_dataset())
    tr, te = data.split_by_image(paths, labels, test_size=0.2, seed=0)
    p_tr, l_tr = [paths[i] for i in tr], [labels[i] for i in tr]
    p_te, l_te = [paths[i] for i in te], [labels[i] for i in te]
    print("| variant | seed | best epoch | validation MAP@R | test recall@1 | test MAP@R | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.variants:
        v = VARIANTS[name]
        for seed in args.seeds:
            t = time.perf_counter()
            learn = train.create_learner(p_tr, l_tr, head=v["head"], seed=seed, valid=0.2, loss=_loss(v.get("loss")))
            if v.get("mixup"):
                from fastai.callback.mixup import MixUp

                learn.add_cb(MixUp(0.4))
            if v["adapt"]:
                frozen = next(cb for cb in learn.cbs if type(cb) is callbacks.FrozenBatchNormStats)
                learn.remove_cb(frozen)
                learn.add_cb(FirstEpochStats())
            result = train.fine_tune(learn, freeze_epochs=v["freeze_epochs"], progress=False,
                                    epochs=v.get("epochs"), lr=v.get("lr"))
            emb, tf = train.embedding_model(learn)
            r = metrics.evaluate_retrieval(features.extract_features(emb, p_te, tf, progress=False), l_te)
            print(f"| {name} | {seed} | {result.best_epoch} | {result.best_score:.3f} | {r['recall@1']:.3f} | "
                  f"{r['map@r']:.3f} | {time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
