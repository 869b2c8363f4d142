"""Checks left out of the default run (markers registered in pyproject.toml):

* ``slow``: the demo on the default data set reproduces the table the README shows
  (``make test-all`` or ``pytest -m slow``; about 2 minutes on 2 CPUs);
* ``gpu``: features and a training epoch on CUDA agree with the CPU (``pytest -m gpu`` on a
  machine with a GPU)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_the_demo_reproduces_the_readme_table(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "utils_cv.similarity", "demo", "--no-progress", "--output",
                           str(tmp_path)], capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| ImageNet", "| fine-tuned"))]
    assert len(rows) == 2
    readme = README.read_text()
    for row in rows:
        assert row in readme, f"README's demo table differs from this run: {row}"
    assert re.search(r"fine-tuned softmax \(160 px\) \| [0-9.]+ \|", rows[1])


@pytest.mark.gpu
def test_features_on_cuda_agree_with_the_cpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from utils_cv.similarity import data, model
    from utils_cv.similarity.features import FeatureExtractor

    paths, _ = data.list_images(data.default_dataset())
    net, transform = model.create_backbone()
    cpu = FeatureExtractor(net, transform).extract(paths[:64]).features
    gpu = FeatureExtractor(net, transform, device="cuda").extract(paths[:64]).features
    assert float(np.min((cpu * gpu).sum(1))) >= 0.999
