"""Post-processing of fine-tuned features without training again: diffusion on the test features
that ``bench_training_quality.py --save-features DIR`` kept.

    .venv/bin/python benchmarks/bench_saved_features.py DIR

Each ``.npz`` there holds one trained model's test features (``<protocol>_<method>_seed<N>[_<row>]``);
the rows group the seeds of one model and give the mean MAP@R and recall@1 of its features as they
are and diffused (``diffusion.diffusion_distances`` with its defaults), leave-one-out over the test
images as in the benchmark that saved them.
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from utils_cv.similarity import metrics
from utils_cv.similarity.diffusion import diffusion_distances

KEYS = ("map@r", "recall@1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path, help="the --save-features folder of bench_training_quality.py")
    args = parser.parse_args()
    files = sorted(args.dir.glob("*.npz"))
    if not files:
        parser.error(f"no .npz files in {args.dir}: run bench_training_quality.py with --save-features {args.dir}")
    rows = defaultdict(list)  # model -> per seed (plain, diffused)
    for path in files:
        saved = np.load(path)
        x, labels = saved["test"], list(saved["test_labels"])
        name = re.sub(r"_seed\d+", "", path.stem).replace("_", " ")
        rows[name].append((metrics.evaluate_retrieval(x, labels),
                           metrics.evaluate_distances(diffusion_distances(x), labels)))
    print("$ .venv/bin/python benchmarks/bench_saved_features.py DIR\n")
    print("| features | seeds | MAP@R | recall@1 | diffused MAP@R | diffused recall@1 |\n|---|---:|---:|---:|---:|---:|")
    for name, results in rows.items():
        cells = [f"{np.mean([r[i][k] for r in results]):.3f}" for i in (0, 1) for k in KEYS]
        print(f"| {name} | {len(results)} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
