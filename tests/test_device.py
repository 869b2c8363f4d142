import subprocess
import sys

import pytest
import torch

from utils_cv.common import device


def test_importing_common_leaves_torch_unloaded():
    code = "import sys, utils_cv.common; print(sorted(m for m in ('torch', 'numpy', 'fastai') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _automatic() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def test_choice_order_override_then_environment_then_hardware(monkeypatch):
    monkeypatch.delenv(device.DEVICE_ENV, raising=False)
    assert device.default_device() == _automatic()
    monkeypatch.setenv(device.DEVICE_ENV, "auto")
    assert device.default_device() == _automatic()
    monkeypatch.setenv(device.DEVICE_ENV, " CPU ")
    assert device.default_device() == torch.device("cpu")
    monkeypatch.setenv(device.DEVICE_ENV, "cuda:1")  # the argument wins over the variable
    assert device.default_device("cpu") == torch.device("cpu")
    assert device.default_device(torch.device("cpu")) == torch.device("cpu")


def test_invalid_names_are_refused_naming_their_source(monkeypatch):
    monkeypatch.setenv(device.DEVICE_ENV, "gpu")
    with pytest.raises(ValueError, match="UTILS_CV_DEVICE.*'cpu', 'mps', 'cuda'.*'gpu'"):
        device.default_device()
    monkeypatch.delenv(device.DEVICE_ENV)
    with pytest.raises(ValueError, match="'override' parameter.*'cuda:x'"):
        device.default_device("cuda:x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_device_is_an_error_not_a_silent_cpu(monkeypatch):
    monkeypatch.setenv(device.DEVICE_ENV, "cuda")
    with pytest.raises(ValueError, match="UTILS_CV_DEVICE=cuda.*0 CUDA device"):
        device.default_device()
