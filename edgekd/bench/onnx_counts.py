"""Parameters and MACs of an ONNX graph, for `edgekd benchmark` on a bare ``.onnx`` file.

A run counts MACs on the PyTorch model (``edgekd.models.stats``); a bare file has no PyTorch
model, so this counts the operators that carry almost all of a classifier's arithmetic:
convolutions and matrix products (float, QDQ and QOperator/integer forms), from the shapes
ONNX shape inference gives. Elementwise ops, pooling and normalisation are not counted (a few
percent at most in conv nets). Parameters are the float and integer weight initializers' elements
(quantization scales, zero points and scalar constants are left out). MACs are per sample: the batch axis is dropped.
"""

from __future__ import annotations

import math
from pathlib import Path

#: operator -> (index of the data input, index of the weight input) for the ops counted
_CONV = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3)}
_MATMUL = {"MatMul": (0, 1), "Gemm": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}
#: initializers feeding these inputs are quantization parameters, not weights
_QPARAM_OPS = {"QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2), "QLinearConv": (1, 2, 4, 5, 6, 7),
               "QLinearMatMul": (1, 2, 4, 5, 6, 7), "ConvInteger": (2, 3), "MatMulInteger": (2, 3)}


def _shapes(model) -> dict[str, list[int | None]]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, list[int | None]] = {}
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    for v in values:
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _per_sample(shape: list[int | None]) -> int | None:
    rest = shape[1:]
    return math.prod(rest) if rest and all(isinstance(d, int) and d > 0 for d in rest) else None


def onnx_params_macs(path: Path) -> tuple[int | None, int | None]:
    """(weight elements, MACs per sample) of an ONNX file; None where shapes are unknown."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    shapes = _shapes(model)
    qparams = {node.input[i] for node in model.graph.node for i in _QPARAM_OPS.get(node.op_type, ())
               if i < len(node.input)}
    # scalars are scales, zero points or constants, not weights
    params = sum(n for init in model.graph.initializer
                 if init.name not in qparams and (n := math.prod(init.dims)) > 1)
    macs = 0
    for node in model.graph.node:
        if node.op_type in _CONV:
            _, w = _CONV[node.op_type]
            weight, out = shapes.get(node.input[w]), shapes.get(node.output[0])
            per_out = math.prod(weight[1:]) if weight and all(isinstance(d, int) for d in weight[1:]) else None
            outputs = _per_sample(out) if out else None
            if per_out is None or outputs is None:
                return params, None
            macs += outputs * per_out  # each output element: C_in/groups * kH * kW multiply-adds
        elif node.op_type in _MATMUL:
            a, b = _MATMUL[node.op_type]
            left, out = shapes.get(node.input[a]), shapes.get(node.output[0])
            if not left or not out or not isinstance(left[-1], int):
                return params, None
            k = left[-1]
            if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
                k = left[0]
            outputs = _per_sample(out) if len(out) > 1 else None
            if outputs is None:
                return params, None
            macs += outputs * k
    return params, macs
