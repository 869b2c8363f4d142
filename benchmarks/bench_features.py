"""Feature-extraction throughput on the default data set.

    .venv/bin/python benchmarks/bench_features.py [--images 192] [--batch-size 32] [--repeats 3]

Rows, all measured here in one process on the same images (best of ``--repeats``):
* forward only: the model the library runs (batch norms folded, channels_last, micro-batches
  of 8) on tensors already decoded: the ceiling for any pipeline that reads JPEG files;
* forward only, the plain model at 32 per call, to show what folding and micro-batches buy;
* naive loop: open, transform and forward one image at a time, default memory layout;
* ``features.extract_features`` from the JPEG files (the library path).
Goals: library / forward-only of the model (batched, channels_last) >= 0.85, library /
naive >= 1.6. The ratio to the folded forward shows what decoding JPEG files still costs.
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from utils_cv.similarity import data, features, model


def best_rates(fns: dict, n: int, repeats: int) -> dict:
    """Images per second of each function, best of ``repeats`` rounds; the functions take
    turns within each round so that a slow spell of the machine hits all of them alike."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: n / t for name, t in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    paths, _ = data.list_images(data.default_dataset())
    paths = paths[:: max(1, len(paths) // args.images)][: args.images]
    n = len(paths)
    net, transform = model.create_backbone()

    ready = torch.stack([transform(data.load_image(p)) for p in paths])

    from utils_cv.similarity.fuse import fold_batchnorm

    folded = fold_batchnorm(net).to(memory_format=torch.channels_last)

    def forward_only(chunk=features._CPU_CHUNK, m=folded):
        with torch.inference_mode():
            for i in range(0, n, chunk):
                m(ready[i : i + chunk].contiguous(memory_format=torch.channels_last))

    def naive():
        m = net
        out = []
        with torch.no_grad():
            for p in paths:
                out.append(m(transform(data.load_image(p))[None]).numpy())
        return np.concatenate(out)

    def library():
        return features.extract_features(net, paths, transform, batch_size=args.batch_size, progress=False)

    plain = copy.deepcopy(net).to(memory_format=torch.channels_last)
    forward_only()  # warm-up
    fns = {
        f"forward only (folded, channels_last, {features._CPU_CHUNK} per call)": forward_only,
        f"forward only (plain model, channels_last, {args.batch_size} per call)": lambda: forward_only(args.batch_size, plain),
        "naive loop (one image at a time, plain model, NCHW)": naive,
        "extract_features from JPEG files": library,
    }
    rows = list(best_rates(fns, n, args.repeats).items())
    assert np.allclose(library(), features.l2_normalize(naive()), atol=1e-4), "all paths give the same features"
    fwd, plain_fwd, nai, lib = (r[1] for r in rows)
    print(f"{n} images of the default data set, efficientnet_lite0 at 224 px, batch {args.batch_size}, "
          f"{torch.get_num_threads()} torch threads, best of {args.repeats}\n")
    print(f"| {'method':56s} | img/s |\n|{'-' * 58}|------:|")
    for name, ips in rows:
        print(f"| {name:56s} | {ips:5.1f} |")
    print(f"\nextract_features / forward only, plain model batched = {lib / plain_fwd:.2f} (goal >= 0.85)")
    print(f"extract_features / forward only, folded as the library runs it = {lib / fwd:.2f} "
          "(the cost of decoding on the same 2 cores)")
    print(f"extract_features / naive loop   = {lib / nai:.2f} (goal >= 1.6)")


if __name__ == "__main__":
    main()
