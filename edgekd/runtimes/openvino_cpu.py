"""OpenVINO's CPU plugin running edgekd's ``.onnx`` files, FP32 and QDQ INT8 alike (``pip install 'edgekd[openvino]'``).

OpenVINO reads ONNX itself (``Core.read_model``), so no conversion step or extra artifact is needed:
QuantizeLinear/DequantizeLinear pairs of the quantize stage's INT8 file become FakeQuantize
nodes, which the plugin's low-precision transformations run as INT8 kernels. It is a second
runtime for the ``onnx`` format, never its parity runtime (that stays ONNX Runtime).

Compile settings, chosen so its figures compare with the other runtimes':

- ``INFERENCE_NUM_THREADS = threads``: the size of the plugin's pool for this compiled model;
- ``PERFORMANCE_HINT = LATENCY`` and ``NUM_STREAMS = 1``: one request at a time, one stream,
  as the benchmark calls every runtime (the throughput hint would split the cores into streams);
- ``INFERENCE_PRECISION_HINT = f32``: on CPUs with AVX512-BF16 or AMX the plugin otherwise runs
  FP32 models in bfloat16, and the accuracy and parity measured would not be the file's;
- ``ENABLE_CPU_PINNING = False``: teacher and student are compiled side by side and timed
  interleaved; pinning both pools to the same cores would only add contention (ONNX Runtime
  does not pin either).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgekd.errors import StageError
from edgekd.runtimes.base import LoadedModel, Runtime


@functools.cache
def _core() -> Any:
    import openvino as ov

    return ov.Core()


@functools.cache
def _onnx_frontend() -> Any:
    """OpenVINO's ONNX reader alone: ``Core.read_model`` would try every frontend it has (TensorFlow,
    PaddlePaddle, ...) on a damaged file, and TensorFlow's parser prints its own errors to stderr."""
    from openvino.frontend import FrontEndManager

    return FrontEndManager().load_by_framework("onnx")


def _reason(exc: BaseException) -> str:
    """The line of an OpenVINO error that says what is wrong. Its messages stack one "Exception from
    <file>:<line>:" and "Check '...' failed at ..." line per C++ frame before the reason."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(("Exception from ", "Check '"))]
    return (reasons or lines or [type(exc).__name__])[-1][:300]


class OpenVinoLoadedModel(LoadedModel):
    runtime = "openvino"

    def __init__(self, compiled: Any, threads: int, path: Path) -> None:
        self.compiled = compiled
        self.threads = threads
        self.path = path
        if len(compiled.inputs) != 1:
            raise StageError(f"openvino: {path} takes {len(compiled.inputs)} inputs; edgekd models take one")
        shape = compiled.input(0).get_partial_shape()
        # None for a dynamic dimension (the batch axis of edgekd's exports), as OrtLoadedModel gives
        self.input_shape = [d.get_length() if d.is_static else None for d in shape]
        first = self.input_shape[0] if self.input_shape else None
        self.max_batch = first if isinstance(first, int) else None
        self._request = compiled.create_infer_request()  # reused: one request at a time, as timed
        self._logits = compiled.output(0)  # the logits are the first output (the exporter names it "logits")

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        # Checked here: compiled with one thread, openvino 2026.4 ran a (2, 1, 80) batch through a
        # model taking (?, 1, 40) and returned an empty (0, 10) result instead of failing.
        if len(batch.shape) != len(self.input_shape) or any(
                want is not None and want != got for want, got in zip(self.input_shape, batch.shape, strict=False)):
            raise StageError(f"openvino: {self.path.name} takes batches shaped "
                             f"({', '.join('N' if d is None else str(d) for d in self.input_shape)}), "
                             f"got {batch.shape}", hint="the artifact was exported for another input shape")
        try:
            out = self._request.infer({0: batch})[self._logits]
        except (RuntimeError, ValueError, TypeError) as exc:  # openvino raises RuntimeError with a C++ trace
            raise StageError(f"openvino failed to run {self.path.name} on a batch shaped {batch.shape} "
                             f"(model input {self.input_shape}): {_reason(exc)}",
                             hint="the artifact was exported for another input shape") from exc
        if out.shape[0] != batch.shape[0]:
            raise StageError(f"openvino returned {out.shape[0]} rows of logits for a batch of {batch.shape[0]} "
                             f"from {self.path.name}", hint="check the artifact's input shape; run it on onnxruntime")
        # the result views the request's own buffer, which the next call overwrites: copy it
        return np.array(out, dtype=np.float32, copy=True)


class OpenVinoRuntime(Runtime):
    name: ClassVar[str] = "openvino"

    @staticmethod
    def compile_config(threads: int) -> dict[str, Any]:
        """The CPU plugin properties a model is compiled with (see the module docstring)."""
        return {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                "INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False}

    def load(self, artifact: Path, threads: int) -> OpenVinoLoadedModel:
        artifact = self._check_file(artifact, threads)
        try:
            frontend = _onnx_frontend()
            model = frontend.convert(frontend.load(str(artifact)))
            compiled = _core().compile_model(model, "CPU", self.compile_config(threads))
        except Exception as exc:  # a truncated or foreign file: GeneralFailure, OpConversionFailure, RuntimeError
            raise self._bad_artifact(artifact, _reason(exc)) from exc
        return OpenVinoLoadedModel(compiled, threads, artifact)
