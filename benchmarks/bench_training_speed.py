"""Seconds per training epoch on the default data set: utils_cv's learner vs fastai's plain
``vision_learner(...).fine_tune`` defaults, in the same run on the same images.

    .venv/bin/python benchmarks/bench_training_speed.py [--image-size 160] [--epochs 1]

Both train EfficientNet-Lite0 (the same offline ImageNet weights) on the 80 % training split
(seed 0), batch 32, one frozen and ``--epochs`` unfrozen epochs; the table gives the mean
seconds of the unfrozen epochs and of the frozen one. fastai's defaults: NCHW memory layout,
its own head (two linear layers with batch norm), batch norms updated while training, no
retrieval validation. utils_cv: channels_last, batch-norm statistics frozen, and one
retrieval validation pass per epoch (included in its time).
"""
from __future__ import annotations

import argparse
import time

import torch


def _timer_callback():
    import fastai.vision.all as fv

    class EpochTimes(fv.Callback):
        order = 100

        def __init__(self):
            self.times, self.frozen = [], []

        def before_epoch(self):
            self.t = time.perf_counter()

        def after_epoch(self):
            trainable = sum(p.requires_grad for p in self.learn.model.parameters())
            total = sum(1 for _ in self.learn.model.parameters())
            self.times.append(time.perf_counter() - self.t)
            self.frozen.append(trainable < total)

    return EpochTimes()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    from utils_cv.common.versions import versions_line

    print(f"versions: {versions_line()}", flush=True)
    import fastai.vision.all as fv

    from utils_cv.similarity import data, model, train

    paths, labels = data.list_images(data.default_dataset())
    tr, _ = data.split_by_image(paths, labels, test_size=0.2, seed=0)
    p_tr, l_tr = [paths[i] for i in tr], [labels[i] for i in tr]

    results = {}
    # utils_cv
    learn = train.create_learner(p_tr, l_tr, image_size=args.image_size, batch_size=args.batch_size, valid=0.2)
    timer = _timer_callback()
    learn.add_cb(timer)
    train.fine_tune(learn, args.epochs, freeze_epochs=1, progress=False)
    results["utils_cv create_learner + fine_tune"] = timer

    # fastai defaults on the same images and split, the same pretrained backbone and normalisation
    block = fv.DataBlock(
        blocks=(fv.ImageBlock, fv.CategoryBlock), get_x=lambda i: fv.PILImage(data.load_image(p_tr[i])),
        get_y=lambda i: l_tr[i], splitter=fv.RandomSplitter(0.2, seed=0),
        item_tfms=fv.Resize(args.image_size),
        batch_tfms=[*fv.aug_transforms(size=args.image_size), fv.Normalize.from_stats([0.5] * 3, [0.5] * 3)])
    dls = block.dataloaders(list(range(len(p_tr))), bs=args.batch_size, num_workers=0, device=torch.device("cpu"))
    arch = lambda pretrained=False, **kw: model.create_backbone()[0]  # noqa: E731  (ImageNet weights, offline)
    plain = fv.vision_learner(dls, arch, pretrained=False, n_out=dls.c, normalize=False)
    timer2 = _timer_callback()
    plain.add_cb(timer2)
    with plain.no_bar(), plain.no_logging():
        plain.fine_tune(args.epochs, freeze_epochs=1)
    results["fastai vision_learner(...).fine_tune defaults"] = timer2

    print(f"EfficientNet-Lite0 at {args.image_size} px, {len(p_tr)} training images (80 % split, seed 0), "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads\n")
    print("| learner | frozen epoch (s) | unfrozen epoch (s) |\n|---|---:|---:|")
    base = None
    for name, t in results.items():
        frozen = [s for s, f in zip(t.times, t.frozen) if f]
        unfrozen = [s for s, f in zip(t.times, t.frozen) if not f]
        fz, uf = (sum(frozen) / max(len(frozen), 1)), (sum(unfrozen) / max(len(unfrozen), 1))
        print(f"| {name} | {fz:.1f} | {uf:.1f} |")
        base = base or (fz, uf)
        last = (fz, uf)
    print(f"\nfastai defaults / utils_cv: frozen {last[0] / base[0]:.2f}x, unfrozen {last[1] / base[1]:.2f}x "
          "(above 1: utils_cv is faster)")


if __name__ == "__main__":
    main()
