"""ORT Mobile: the ``.ort`` file run the way a phone app runs it, on ONNX Runtime's CPU provider.

ONNX Runtime's PyPI wheel ships only the CPU execution provider (no NNAPI, CoreML or
XNNPACK), so this runtime loads the ``.ort`` flatbuffer into that build with mobile-style
session options:

- ``session.load_model_format = ORT``: the file is read as an ORT-format model, never ONNX;
- ``graph_optimization_level = DISABLE_ALL``: the ``.ort`` already holds the graph optimised at
  conversion time, and a minimal (mobile) ONNX Runtime build cannot optimise at load time;
- a fixed ``intra_op_num_threads``, ``inter_op_num_threads = 1``, sequential execution, and no
  spinning of idle pool threads (spinning burns a phone's battery; on a shared box it steals cores).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from edgekd.errors import StageError
from edgekd.runtimes.onnxruntime_cpu import OnnxRuntimeCPU, OrtLoadedModel


class OrtMobileRuntime(OnnxRuntimeCPU):
    name: ClassVar[str] = "ort-mobile"

    def session_options(self, threads: int):
        import onnxruntime as ort

        so = super().session_options(threads)
        so.add_session_config_entry("session.load_model_format", "ORT")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return so

    def load(self, artifact: Path, threads: int) -> OrtLoadedModel:
        artifact = Path(artifact)
        if artifact.suffix.lower() == ".onnx":
            raise StageError(f"ort-mobile runs .ort files, not {artifact.name}",
                             hint="convert it first: edgekd export MODEL --to ort, or use the onnxruntime runtime")
        return super().load(artifact, threads)
