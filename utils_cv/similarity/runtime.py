"""Where the feature extractor's forward pass runs: eager torch (the default), ONNX Runtime
or OpenVINO.

:class:`~utils_cv.similarity.features.FeatureExtractor` always starts from a private,
prepared copy of the model (:func:`prepared`: eval mode, batch norms folded, channels_last on
the CPU). With ``runtime="onnx"`` or ``"openvino"`` that copy is exported once per input
shape to ONNX (opset :data:`OPSET`, a dynamic batch axis) and run by the other runtime on the
CPU. Exports are cached in ``cache_dir("exported")`` (beside the weights cache,
``$UTILS_CV_CACHE``), named by a sha256 of the weights, the module's structure, the input
shape and the torch version, and written atomically, so a second extractor or a second
process loads the file instead of exporting again.

Precisions (:data:`PRECISIONS`): ``fp32`` everywhere (features equal to eager torch to
float rounding); ``int8`` on ONNX Runtime (static quantisation, per-channel int8 weights and
uint8 activations calibrated on a few hundred images: by default images of the shipped data
set); ``bf16`` on OpenVINO (bfloat16 arithmetic where the CPU has it: AVX512-BF16 or AMX).
What each costs in retrieval quality and what it gains in speed: BENCHMARKS.md, "Feature
extraction". Both runtimes are optional packages (``pip install utils_cv[onnx]`` or
``[openvino]``); asking for one that is not installed says so.
"""
from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import threading
import warnings
import weakref
from concurrent.futures import Future
from typing import Callable

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["OPSET", "PRECISIONS", "RUNTIMES", "ExportedModel", "check_runtime", "prepared"]

RUNTIMES = ("torch", "onnx", "openvino")
PRECISIONS = {"torch": ("fp32",), "onnx": ("fp32", "int8"), "openvino": ("fp32", "bf16")}
OPSET = 17
CALIBRATION_IMAGES = 256  # default number of images for int8 calibration
_PACKAGES = {"onnx": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino")}


def check_runtime(runtime: str, precision: str, device: torch.device | None = None) -> None:
    """Refuse an unknown runtime or precision, a precision the runtime does not offer, an
    exported runtime on another ``device`` than the CPU (None: the CPU), or one whose package
    is missing."""
    if runtime not in RUNTIMES:
        raise ValueError(f"The 'runtime' parameter must be one of {list(RUNTIMES)}. Got {runtime!r} instead.")
    if precision not in PRECISIONS[runtime]:
        raise ValueError(f"The 'precision' parameter must be one of {list(PRECISIONS[runtime])} with "
                         f"runtime={runtime!r}. Got {precision!r} instead.")
    if runtime == "torch":
        return
    if device is not None and device.type != "cpu":
        raise ValueError(f"runtime={runtime!r} runs on the CPU; on {device.type} use runtime='torch' (the GPU "
                         "path), or pass device='cpu'.")
    package, extra = _PACKAGES[runtime]
    try:
        __import__(package)
        if runtime == "onnx":
            __import__("onnx")
    except ImportError as exc:
        raise ImportError(f"runtime={runtime!r} needs the {package} package: pip install 'utils_cv[{extra}]' "
                          f"(or pip install {package}{' onnx' if runtime == 'onnx' else ''}).") from exc


# ---------------------------------------------------------------------------- the eager copy
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (key, prepared copy)
_PREPARED_LOCK = threading.Lock()


def _weights_key(module: nn.Module, *options) -> tuple:
    """Changes when any parameter or buffer is replaced or updated in place (an optimiser step),
    or the structure or settings the repr shows (e.g. a SimilarityNet's class-score weight)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return (*options, str(module), tuple(t._version for t in tensors), tuple(t.data_ptr() for t in tensors))


def prepared(module: nn.Module, device: torch.device, fold_bn: bool, channels_last: bool) -> nn.Module:
    """A private inference copy of ``module``: eval mode, no gradients, on ``device``, batch
    norms folded, channels_last on the CPU.

    Copies are shared by extractors built for the same unchanged model (they only run it
    under ``torch.inference_mode``), so that repeated ``extract_features`` calls prepare it
    once. They are held in a side table keyed weakly on the model, never on the model itself:
    the entry goes when the model does, and a weight change makes a new copy.
    """
    key = _weights_key(module, str(device), fold_bn, channels_last)
    with _PREPARED_LOCK:
        hit = _PREPARED.get(module)
    if hit is not None and hit[0] == key:
        return hit[1]
    try:
        out = copy.deepcopy(module)
    except Exception as exc:  # noqa: BLE001 - e.g. a module holding a lock or an open file
        raise TypeError(f"The 'model' parameter ({type(module).__name__}) cannot be copied ({exc}); "
                        "FeatureExtractor runs a private copy so that the model passed is never changed.") from exc
    out = out.eval().requires_grad_(False).to(device)
    if fold_bn:
        from utils_cv.similarity.fuse import fold_batchnorm

        out = fold_batchnorm(out)
    if channels_last:
        out = out.to(memory_format=torch.channels_last)
    with _PREPARED_LOCK:
        _PREPARED[module] = (key, out)
    return out


# ---------------------------------------------------------------------------- exported runtimes
def _digest(module: nn.Module, shape: tuple, tag: str = "") -> str:
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}|{shape}|{OPSET}|"
                       f"{torch.__version__}|{tag}|{module}".encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def export_onnx(module: nn.Module, shape: tuple, prepare: Callable[[], nn.Module] | None = None,
                tag: str = "") -> "os.PathLike":
    """The cached ONNX file of ``module`` for inputs (B, *shape), exported when missing.

    ``prepare`` gives the copy actually exported (e.g. :func:`prepared`'s, batch norms folded)
    and is called only when the file is missing; the file is named by ``module``'s weights,
    structure and ``tag`` (what ``prepare`` does), so a cached export costs no preparation."""
    from utils_cv.common.paths import atomic_write, cache_dir

    path = cache_dir("exported") / f"{_digest(module, shape, tag)}.onnx"
    if path.is_file():
        return path
    if prepare is not None:
        module = prepare()
    buf = io.BytesIO()
    example = torch.zeros((2, *shape))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice: it is the stable one here
        torch.onnx.export(module, (example,), buf, input_names=["images"], output_names=["features"],
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, opset_version=OPSET,
                          dynamo=False)
    with atomic_write(path) as f:
        f.write(buf.getvalue())
    logger.info("exported the model for inputs %s to %s", shape, path)
    return path


def quantize_int8(fp32_path, calibration: np.ndarray) -> "os.PathLike":
    """The cached int8 (QDQ, per-channel weights) model of ``fp32_path`` calibrated on the
    preprocessed batch ``calibration`` ((N, *shape) float32)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    key = hashlib.sha256(calibration.tobytes()).hexdigest()[:16]
    path = fp32_path.with_name(f"{fp32_path.stem}-int8-{key}.onnx")
    if path.is_file():
        return path

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.split(calibration, range(16, len(calibration), 16)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    tag = f"{os.getpid()}.{threading.get_ident()}"
    pre, out = path.with_name(f".{path.stem}.{tag}.pre.onnx"), path.with_name(f".{path.stem}.{tag}.onnx")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(fp32_path), str(pre))
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        os.replace(out, path)
    finally:
        pre.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
    logger.info("quantised %s to int8 on %d calibration images: %s", fp32_path.name, len(calibration), path)
    return path


class ExportedModel:
    """Runs a prepared module through ONNX Runtime or OpenVINO: called with a (B, C, H, W)
    float tensor on the CPU, returns the module's output as a tensor. One exported model per
    input shape, made on first use (see the module doc).

    Args:
        module: the model to run; its weights when a shape is first built are exported.
        runtime: ``"onnx"`` or ``"openvino"``.
        precision: see :data:`PRECISIONS`.
        calibration: for ``int8``, a callable giving the preprocessed calibration batch
            ((N, C, H, W) float32) when first needed.
        threads: intra-op threads (default: ``torch.get_num_threads()``).
        prepare: gives the inference copy to export (default: ``module`` itself); called only
            when no cached export exists, which ``tag`` (what ``prepare`` does) helps name.
    """

    def __init__(self, module: nn.Module, runtime: str, precision: str = "fp32", calibration=None,
                 threads: int | None = None, prepare: Callable[[], nn.Module] | None = None, tag: str = ""):
        self.module, self.runtime, self.precision = module, runtime, precision
        self.calibration = calibration
        self.threads = threads or torch.get_num_threads()
        self.prepare, self.tag = prepare, tag
        self._runners: dict = {}
        self._lock = threading.Lock()

    def warm_up(self, shape: tuple) -> None:
        """Start making the runner for inputs (B, *shape) in a background thread, so that the
        export or compilation overlaps with decoding the first images; the first call for that
        shape waits for it (and raises its error, if any)."""
        shape = tuple(shape)
        with self._lock:
            if shape in self._runners:
                return
            future = self._runners[shape] = Future()

        def build():
            try:
                future.set_result(self._build(shape))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller that waits for it
                future.set_exception(exc)

        threading.Thread(target=build, name="utils_cv-export", daemon=True).start()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        shape = tuple(batch.shape[1:])
        runner = self._runners.get(shape)
        if runner is None:
            with self._lock:
                runner = self._runners.get(shape)
                if runner is None:
                    runner = self._runners[shape] = self._build(shape)
        if isinstance(runner, Future):
            try:
                runner = runner.result()
            except BaseException:
                with self._lock:  # the next call tries again
                    self._runners.pop(shape, None)
                raise
        return torch.from_numpy(runner(np.ascontiguousarray(batch.float().numpy())))

    def _build(self, shape: tuple):
        path = export_onnx(self.module, shape, self.prepare, self.tag)
        if self.precision == "int8":
            calib = self.calibration() if callable(self.calibration) else self.calibration
            if calib is None or len(calib) == 0:
                raise ValueError("precision='int8' needs calibration images (the 'calibration' parameter).")
            path = quantize_int8(path, np.asarray(calib, dtype=np.float32))
        if self.runtime == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # idle threads sleep instead of spinning: between two batches this process decodes
            # images, and spinning threads would take the cores it decodes on
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            return lambda x: session.run(None, {"images": x})[0]
        import openvino as ov

        compiled = ov.Core().compile_model(str(path), "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": self.threads,
            "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32"})
        request, lock = compiled.create_infer_request(), threading.Lock()  # one request: one call at a time
        logger.info("OpenVINO runs %s at %s", path.name, compiled.get_property("INFERENCE_PRECISION_HINT"))

        def run(x):
            with lock:
                return np.array(request.infer({0: x})[0], copy=True)

        return run
