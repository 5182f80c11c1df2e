"""Small ONNX graph facts and edits the quantize stage needs.

Kept apart from the quantizers so each helper can be read (and tested) on its own.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgekd.errors import StageError

#: operators whose INT8 kernels carry the speed-up; the accuracy-aware fallback ranks these
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: operators that show a node was quantized (QDQ pairs, QOperator kernels, dynamic kernels)
QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
             "MatMulInteger", "ConvInteger", "QGemm", "QLinearAdd", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


class NothingQuantizedError(StageError):
    """The quantizer left every operator in float: a property of the model, not of one candidate."""


def load_model(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises several unrelated types for a bad file
        raise StageError(f"cannot read ONNX model {path}: {exc}") from exc


def single_input_name(model: onnx.ModelProto) -> str:
    """The graph's one real input (initializers listed as inputs by old exporters are skipped)."""
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if len(names) != 1:
        raise StageError(f"the quantize stage supports models with one input; this one has {len(names)}: {names}")
    return names[0]


def name_unnamed_nodes(model: onnx.ModelProto) -> int:
    """Give every node a unique name: ``nodes_to_exclude`` and the sensitivity report refer to nodes by name."""
    seen: set[str] = set()
    renamed = 0
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
            renamed += 1
        seen.add(node.name)
    return renamed


def weighted_nodes(path: Path) -> list[str]:
    """Names of the nodes with weights (Conv, Gemm, MatMul ...), in graph order."""
    model = load_model(path)
    return [n.name for n in model.graph.node if n.op_type in WEIGHTED_OPS]


def op_histogram(path: Path) -> dict[str, int]:
    return dict(Counter(n.op_type for n in load_model(path).graph.node))


def quantized_op_count(path: Path) -> int:
    hist = op_histogram(path)
    return sum(hist.get(op, 0) for op in QUANT_OPS)


def unsigned_activations(model: onnx.ModelProto) -> int:
    """Rewrite signed INT8 activation Q/DQ pairs to unsigned ones, in place; weights stay signed.

    ``uint8 = int8 + 128`` with the zero point moved by the same 128 is exact (same scale, same
    clamping range), yet ONNX Runtime's x86 kernels for u8 activations x s8 weights are the fast
    ones: the signed form of the same model ran 1.2-2.1x slower than FP32 here. The PT2E/XNNPACK
    flow (QAT) emits signed activations, so its ONNX export goes through this rewrite.
    Returns the number of Q/DQ nodes changed.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    unsigned: dict[str, onnx.TensorProto] = {}

    def signed_zero_point(node: onnx.NodeProto) -> bool:
        zp = node.input[2] if len(node.input) == 3 else ""
        return zp in inits and inits[zp].data_type == onnx.TensorProto.INT8

    def to_unsigned(name: str) -> str:
        if name not in unsigned:
            shifted = numpy_helper.to_array(inits[name]).astype(np.int16) + 128
            unsigned[name] = numpy_helper.from_array(shifted.astype(np.uint8), f"{name}__u8")
        return unsigned[name].name

    changed, q_outputs = 0, set()
    for node in graph.node:
        is_activation_q = node.op_type == "QuantizeLinear"
        # a DQ fed by a Q is an activation; a DQ fed by an initializer is a weight (left signed)
        is_activation_dq = (node.op_type == "DequantizeLinear" and node.input[0] in producer
                            and producer[node.input[0]].op_type == "QuantizeLinear")
        if (is_activation_q or is_activation_dq) and signed_zero_point(node):
            node.input[2] = to_unsigned(node.input[2])
            changed += 1
            if is_activation_q:
                q_outputs.add(node.output[0])
    for info in graph.value_info:
        if info.name in q_outputs:
            info.type.tensor_type.elem_type = onnx.TensorProto.UINT8
    graph.initializer.extend(unsigned.values())
    used = {name for node in graph.node for name in node.input}
    stale = [init for init in graph.initializer if init.name not in used]
    for init in stale:
        graph.initializer.remove(init)
    return changed


def fused_at_load(path: Path, float_nodes: list[str]) -> list[str]:
    """Which of ``float_nodes`` (names of nodes the quantizer left in float) ONNX Runtime no longer runs in
    float once it has optimised the graph as the deployed session does (``ORT_ENABLE_ALL``): its QDQ fusions
    can fold a float Conv between a DequantizeLinear and a QuantizeLinear back into an integer kernel, so a
    node "kept in float" in the file may not be in float where it runs. Empty when every one survives or
    the check cannot run (an optimiser error is not this stage's failure)."""
    import tempfile

    import onnxruntime as ort

    if not float_nodes:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        optimised = Path(tmp) / "optimised.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(optimised)
        options.log_severity_level = 3  # its warning about serialising hardware-specific fusions is expected here
        try:
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            graph = onnx.load(str(optimised), load_external_data=False).graph
        except Exception:  # noqa: BLE001 - a debugging fact, never the stage's failure
            return []
    # a float node fused with its activation survives as "fused <name>" (FusedConv, FusedGemm): still float
    still_float = {n.name.split(" ")[-1] for n in graph.node
                   if n.op_type in WEIGHTED_OPS or n.op_type.startswith("Fused")}
    return [name for name in float_nodes if name not in still_float]
