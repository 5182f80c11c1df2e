"""ONNX Runtime dynamic INT8: weights quantized offline, activations at run time (no calibration).

Meant for Linear/MatMul-heavy models (MLPs, transformers). On conv nets ORT's ConvInteger path
ran 8-16x slower than FP32 here; the speed-aware search keeps FP32 in that case.
"""

from __future__ import annotations

from pathlib import Path

from onnxruntime.quantization import quantize_dynamic

from edgekd.quantize.config import DynamicCandidate
from edgekd.quantize.graph import NothingQuantizedError, load_model, quantized_op_count
from edgekd.quantize.ort_static import QUANT_TYPES, quantizer_output


def quantize_dynamic_candidate(prepared: Path, out_path: Path, candidate: DynamicCandidate, *,
                               nodes_to_exclude: list[str] | None = None) -> Path:
    with quantizer_output(out_path, f"ORT dynamic quantization ({candidate.label})") as tmp:
        quantize_dynamic(str(prepared), str(tmp), per_channel=candidate.per_channel,
                         reduce_range=candidate.reduce_range, weight_type=QUANT_TYPES[candidate.weight_type],
                         nodes_to_exclude=list(nodes_to_exclude or []))
    if quantized_op_count(out_path) == 0:
        ops = sorted({n.op_type for n in load_model(prepared).graph.node})
        raise NothingQuantizedError(
            f"ONNX Runtime's dynamic quantizer found no MatMul/Gemm/Conv/Attention to quantize "
            f"(operators: {', '.join(ops)})", hint="use method: ort_static, or no quantize stage for this model")
    return out_path
