"""ONNX Runtime with its CPU execution provider (the only one in the PyPI ``onnxruntime`` wheel).

Threads: ``intra_op_num_threads`` is the size of the session's own pool that splits one
operator (a convolution, a GEMM) across cores; ``inter_op_num_threads`` = 1 with sequential
execution, because these classifier graphs are chains with nothing to run side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgekd.errors import StageError
from edgekd.runtimes.base import LoadedModel, Runtime


class OrtLoadedModel(LoadedModel):
    def __init__(self, session: Any, runtime: str, threads: int, path: Path) -> None:
        self.session = session
        self.runtime = runtime
        self.threads = threads
        self.path = path
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1:
            raise StageError(f"{runtime}: {path} takes {len(inputs)} inputs; edgekd models take one batch tensor")
        self.input_name = inputs[0].name
        # the logits are the first output (the exporter names it "logits")
        self.output_name = outputs[0].name
        self.input_shape = list(inputs[0].shape)
        first = self.input_shape[0] if self.input_shape else None
        self.max_batch = first if isinstance(first, int) else None

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        try:
            (out,) = self.session.run([self.output_name], {self.input_name: batch})
        except Exception as exc:  # onnxruntime raises its own pybind types (InvalidArgument, Fail)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StageError(f"{self.runtime} failed to run {self.path.name} on a batch shaped {batch.shape} "
                             f"(model input {self.input_shape}): {first}",
                             hint="the artifact was exported for another input shape") from exc
        return np.asarray(out, dtype=np.float32)


class OnnxRuntimeCPU(Runtime):
    name: ClassVar[str] = "onnxruntime"

    def session_options(self, threads: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
        # Idle pool threads spin by default; when teacher and student sessions are timed interleaved,
        # one session's spinning threads steal the cores of the other (measured here at 2 threads:
        # ResNet-20 bs32 50 ms interleaved vs 18 ms with spinning off, 18 ms alone either way).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return so

    def load(self, artifact: Path, threads: int) -> OrtLoadedModel:
        import onnxruntime as ort

        artifact = self._check_file(artifact, threads)
        try:
            session = ort.InferenceSession(str(artifact), sess_options=self.session_options(threads),
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # InvalidProtobuf, Fail, NotImplemented... all pybind types
            raise self._bad_artifact(artifact, exc) from exc
        return OrtLoadedModel(session, self.name, threads, artifact)
