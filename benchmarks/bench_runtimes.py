"""Feature extraction through eager torch, ONNX Runtime and OpenVINO: speed and retrieval quality.

    .venv/bin/python benchmarks/bench_runtimes.py [--images 192] [--repeats 5] [--protocol same|disjoint|both|none]

Speed (the same 192 images of the default data set as bench_features.py, EfficientNet-Lite0
at 224 px, batch 32, 2 threads, best of ``--repeats``, the methods taking turns in each round):
``forward only`` runs the extractor's model on tensors already preprocessed, in the chunks of 4
the extractor uses; ``extract`` is ``FeatureExtractor(..., runtime=, precision=).extract(paths)``
from the JPEG files (decode, resize, forward), with the same preprocessing for every runtime,
first as the library chooses by default (the exported runtimes decode the next batches in 2
threads while the model runs, eager torch in the main thread), then with the other choice, and
with a DataLoader worker process decoding. Every ratio is against eager torch in the same run. Exported models are cached, so the
one-time export and quantisation are not in the timings (reported once, from a cold cache).

Quality: MAP@R and recall@1 of the ImageNet features on the README's two protocols (as
bench_training_free.py: the 92 test images of the default data set; the 2,262 images of the 18
test classes of the openclipart benchmark), leave-one-out, for each runtime and precision.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from utils_cv.similarity import data, features, metrics, model

# (runtime, precision, decode worker processes, decode threads: None = the library's choice)
CONFIGS = [("torch", "fp32", 0, None), ("onnx", "fp32", 0, None), ("openvino", "fp32", 0, None),
           ("onnx", "int8", 0, None), ("openvino", "bf16", 0, None),
           ("torch", "fp32", 0, 2), ("onnx", "fp32", 0, 0), ("openvino", "fp32", 0, 0), ("openvino", "bf16", 0, 0),
           ("torch", "fp32", 1, None), ("openvino", "fp32", 1, None), ("openvino", "bf16", 1, None)]


def name(cfg) -> str:
    runtime, precision, workers, threads = cfg
    how = f", {workers} decode worker process" if workers else (
        ", decoding in the main thread" if threads == 0 else f", {threads} decode threads" if threads else "")
    return f"{runtime} {precision}{how}"


def speed(args) -> None:
    paths, _ = data.list_images(data.default_dataset())
    paths = paths[:: max(1, len(paths) // args.images)][: args.images]
    n = len(paths)
    net, tf = model.create_backbone()
    ready = torch.stack([tf(data.load_image(p)) for p in paths])
    extractors, cold = {}, {}
    for cfg in CONFIGS:
        t = time.perf_counter()
        fe = features.FeatureExtractor(net, tf, batch_size=32, runtime=cfg[0], precision=cfg[1], num_workers=cfg[2],
                                       decode_threads=cfg[3])
        fe.extract(paths[:4], progress=False)  # export (or load the cached export) and warm up
        cold[cfg] = time.perf_counter() - t
        extractors[cfg] = fe

    def forward(fe):
        with torch.inference_mode():
            for part in ready.split(fe.chunk_size):
                fe._model(part.contiguous(memory_format=torch.channels_last) if fe.channels_last else part)

    fns = {}
    for cfg, fe in extractors.items():
        if cfg[2] == 0 and cfg[3] is None:
            fns[(cfg, "forward")] = lambda fe=fe: forward(fe)
        fns[(cfg, "extract")] = lambda fe=fe: fe.extract(paths, progress=False)
    best = {k: float("inf") for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    rate = {k: n / t for k, t in best.items()}
    base_f, base_e = rate[(CONFIGS[0], "forward")], rate[(CONFIGS[0], "extract")]
    print(f"{n} images of the default data set, efficientnet_lite0 at 224 px, batch 32, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}\n")
    print("| runtime | forward only img/s | vs torch | extract img/s | vs torch | first use s |")
    print("|---|---:|---:|---:|---:|---:|")
    for cfg in CONFIGS:
        f = rate.get((cfg, "forward"))
        e = rate[(cfg, "extract")]
        fcol = f"{f:.1f} | {f / base_f:.2f}x" if f else "- | -"
        print(f"| {name(cfg)} | {fcol} | {e:.1f} | {e / base_e:.2f}x | {cold[cfg]:.1f} |")
    print("\n'first use': building the extractor and embedding 4 images; the ONNX export is made once and "
          "shared by both runtimes (the rows run in this order), int8 adds its calibration")


def quality(args) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_training_free import _disjoint, _same

    protocols = {"same": [_same], "disjoint": [_disjoint], "both": [_same, _disjoint]}[args.protocol]
    net, tf = model.create_backbone()
    print("\n| protocol | runtime | MAP@R | change | recall@1 | change | cosine to torch: mean | min |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for make in protocols:
        label, paths, labels = make()
        ref = None
        for cfg in [c for c in CONFIGS if c[2] == 0 and c[3] is None]:
            x = features.FeatureExtractor(net, tf, runtime=cfg[0], precision=cfg[1]).extract(paths, progress=False)
            x = x.features
            r = metrics.evaluate_retrieval(x, labels, metrics=("recall", "map@r"), ks=(1,))
            if ref is None:
                ref, base = x, r
            cos = (x * ref).sum(1)
            print(f"| {label} ({len(paths)}) | {name(cfg)} | {r['map@r']:.4f} | {r['map@r'] - base['map@r']:+.4f} | "
                  f"{r['recall@1']:.4f} | {r['recall@1'] - base['recall@1']:+.4f} | {cos.mean():.5f} | "
                  f"{cos.min():.5f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--protocol", default="both", choices=["same", "disjoint", "both", "none"])
    parser.add_argument("--cold", action="store_true",
                        help="export into an empty cache folder (first-use times from scratch)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("$ .venv/bin/python benchmarks/bench_runtimes.py " + " ".join(sys.argv[1:]) + "\n")
    if args.cold:  # the ImageNet weights come from their package, so only the exports start empty
        os.environ["UTILS_CV_CACHE"] = tempfile.mkdtemp(prefix="utils_cv_cold_")
    speed(args)
    if args.protocol != "none":
        quality(args)


if __name__ == "__main__":
    main()
