"""Feature-extraction throughput on the default data set: the library path vs a naive baseline.

    .venv/bin/python benchmarks/bench_features.py [--images 192] [--batch-size 32]

Baseline: decode in the main process, default (NCHW) memory layout, a plain forward per
batch. Library: ``features.extract_features`` (DataLoader workers decoding while the model
runs, ``channels_last``, ``inference_mode``). Both run here, in the same process, on the same
images; the table prints images per second and the ratio.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from utils_cv.similarity import data, features, model


def naive(net, paths, transform, batch_size):
    out = []
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            x = torch.stack([transform(data.load_image(p)) for p in paths[i : i + batch_size]])
            out.append(net(x).numpy())
    return features.l2_normalize(np.concatenate(out))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    paths, _ = data.list_images(data.default_dataset())
    paths = paths[:: max(1, len(paths) // args.images)][: args.images]
    net, transform = model.create_backbone()
    naive(net, paths[:32], transform, args.batch_size)  # warm-up
    rows = []
    t = time.perf_counter()
    ref = naive(net, paths, transform, args.batch_size)
    base = len(paths) / (time.perf_counter() - t)
    rows.append(("naive (main-process decode, NCHW, no_grad)", base))
    for workers in (0, 1):
        t = time.perf_counter()
        got = features.extract_features(net, paths, transform, batch_size=args.batch_size, num_workers=workers, progress=False)
        rows.append((f"extract_features (channels_last, {workers} worker(s))", len(paths) / (time.perf_counter() - t)))
        assert np.allclose(got, ref, atol=1e-4), "both paths must give the same features"
    print(f"{len(paths)} images, efficientnet_lite0 at 224 px, batch {args.batch_size}, {torch.get_num_threads()} torch threads\n")
    print(f"| {'method':50s} | img/s | vs naive |\n|{'-' * 52}|------:|---------:|")
    for name, ips in rows:
        print(f"| {name:50s} | {ips:5.1f} | {ips / base:7.2f}x |")


if __name__ == "__main__":
    main()
