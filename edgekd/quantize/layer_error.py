"""Where an INT8 ONNX model loses accuracy: per-tensor error of the QDQ graph against FP32.

ONNX Runtime's own debugging tools (``onnxruntime.quantization.qdq_loss_debug``) do the work: both
graphs are augmented to output every intermediate float tensor, run on the same real validation
samples, and matched by tensor name. For each activation the result holds two signal-to-quantization-
noise ratios (SQNR, dB; higher is better, every 6 dB is about one bit):

- ``qdq_err``: the tensor before vs after its own Quantize/DequantizeLinear pair: the error this one
  quantization step adds;
- ``xmodel_err``: the FP32 model's tensor vs the INT8 model's dequantized one: the error accumulated
  up to this point of the network.

A layer whose ``xmodel_err`` drops sharply against its input's (``sqnr_drop_db``) is where accuracy goes;
a low ``qdq_err`` says its activation range is hard to represent in 8 bits (outliers). Where the quantizer
folded a Relu or Clip into the Q/DQ range, ``qdq_err`` compares the activation of the pair's input with its
output (ORT's own ``compute_activation_error`` compares the pre-activation tensor and reads about 3 dB). Only QDQ models
can be matched (QOperator graphs fuse the pairs away): other formats give ``None``, and the quantize
stage then reads the error of the graph's QDQ twin (same settings, QDQ format) when it made one.
"""

from __future__ import annotations

import math
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

#: rows kept in the report (the worst first); report.json keeps them all
MAX_ROWS = 200


class _Reader:
    """``CalibrationDataReader`` over real samples, one batch per call (ORT's tools take this protocol)."""

    def __init__(self, input_name: str, x: np.ndarray, batch_size: int) -> None:
        self.batches = iter([{input_name: np.ascontiguousarray(x[i:i + batch_size], dtype=np.float32)}
                             for i in range(0, len(x), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


#: kernels that show a QOperator or dynamic graph: its Q/DQ pairs are fused into integer operators, so the
#: float tensors inside have nothing to be matched against
_FUSED_PREFIXES = ("QLinear", "DynamicQuantize")
_FUSED_OPS = {"ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "QAttention"}


def is_qdq_graph(model: onnx.ModelProto) -> bool:
    """True when ``model`` is a QDQ graph (float operators between QuantizeLinear/DequantizeLinear pairs), the
    only form ONNX Runtime's QDQ debugging tools can match; False for QOperator and dynamic graphs, which keep a
    QuantizeLinear at the input and a DequantizeLinear at the output but fuse everything between."""
    ops = {n.op_type for n in model.graph.node}
    if "QuantizeLinear" not in ops or "DequantizeLinear" not in ops:
        return False
    return not any(op in _FUSED_OPS or op.startswith(_FUSED_PREFIXES) for op in ops)


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return round(f, 2) if math.isfinite(f) else None


def _fused_activation(node: onnx.NodeProto | None, initializers: dict[str, np.ndarray]
                      ) -> Callable[[np.ndarray], np.ndarray] | None:
    """The function of a Relu or constant-bound Clip that ORT's QDQ quantizer folds into the Q/DQ range (the
    node is removed and the quantization clamps instead), or None. In the QDQ graph the pair's input is then
    the tensor *before* the activation, so "its own Q/DQ error" must compare activation(pre) with post, not
    pre with post (which measures the ReLU, not the quantization: 3 dB on every ReLU output)."""
    if node is None:
        return None
    if node.op_type == "Relu":
        return lambda a: np.maximum(a, 0.0)
    if node.op_type == "Clip":
        def bound(index: int) -> float | None:  # Clip's optional min (input 1) and max (input 2), if constant
            value = initializers.get(node.input[index]) if len(node.input) > index else None
            return None if value is None else float(np.asarray(value).reshape(-1)[0])

        low, high = bound(1), bound(2)
        attrs = {a.name: a.f for a in node.attribute}  # opset < 11 keeps the bounds as attributes
        low, high = attrs.get("min", low), attrs.get("max", high)
        return lambda a: np.clip(a, low, high)
    return None


def layer_errors(fp32_path: Path, qdq_path: Path, x: np.ndarray, workdir: Path, *, batch_size: int = 32
                 ) -> list[dict[str, Any]] | None:
    """Per-activation SQNR of ``qdq_path`` against ``fp32_path`` (the float graph it was quantized from) on
    samples ``x`` [N, C, H, W] float32; rows in graph order, each ``{tensor, node, op_type, xmodel_sqnr_db,
    qdq_sqnr_db, sqnr_drop_db}``. ``sqnr_drop_db``: how much of the accumulated SQNR this node loses against
    the worst of its inputs (positive = this node is where error grows; the report sorts by it). None when
    the INT8 graph is not a QDQ graph (``is_qdq_graph``: QOperator, dynamic quantization). ``workdir`` holds
    the augmented copies while they run and is removed when left empty. Source: ONNX Runtime's
    ``onnxruntime.quantization.qdq_loss_debug`` (activation collection, matching, SQNR)."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_signal_to_quantization_noice_ratio,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    if not is_qdq_graph(onnx.load(str(qdq_path), load_external_data=False)):
        return None
    fp32 = onnx.load(str(fp32_path), load_external_data=False)
    input_name = fp32.graph.input[0].name
    producer = {out: node for node in fp32.graph.node for out in node.output}
    initializers = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer if i.data_type == 1}
    constants = {i.name for i in fp32.graph.initializer}
    workdir.mkdir(parents=True, exist_ok=True)
    fp32_aug, qdq_aug = workdir / "fp32.debug.onnx", workdir / "int8.debug.onnx"
    modify_model_output_intermediate_tensors(str(fp32_path), str(fp32_aug))
    modify_model_output_intermediate_tensors(str(qdq_path), str(qdq_aug))
    try:
        float_acts = collect_activations(str(fp32_aug), _Reader(input_name, x, batch_size))
        qdq_acts = collect_activations(str(qdq_aug), _Reader(input_name, x, batch_size))
        matching = create_activation_matching(qdq_acts, float_acts)
    finally:  # the augmented copies are as large as the models and only needed here
        for path in (fp32_aug, qdq_aug):
            path.unlink(missing_ok=True)
        if not any(workdir.iterdir()):
            workdir.rmdir()
    order = {out: i for i, node in enumerate(fp32.graph.node) for out in node.output}
    rows: dict[str, dict[str, Any]] = {}
    for tensor, match in matching.items():
        node = producer.get(tensor)
        pre, post = match.get("pre_qdq"), match.get("post_qdq")
        fused = _fused_activation(node, initializers)
        if fused is not None and pre:
            pre = [fused(a) for a in pre]
        own = compute_signal_to_quantization_noice_ratio(pre, post) if pre and post else None
        accumulated = compute_signal_to_quantization_noice_ratio(match["float"], post) \
            if match.get("float") and post else None
        rows[tensor] = {"tensor": tensor, "node": node.name if node is not None else "(graph input)",
                        "op_type": node.op_type if node is not None else "input",
                        "xmodel_sqnr_db": _finite(accumulated), "qdq_sqnr_db": _finite(own)}
    def measured_inputs(node: onnx.NodeProto | None) -> list[float]:
        """The accumulated SQNR of the nearest measured tensors upstream of ``node``'s inputs: an input with no
        row (a Conv output whose Relu the quantizer folded, a residual Add) is walked back through its
        producer, so the drop is charged to the node where it shows."""
        found, seen, todo = [], set(), list(node.input) if node is not None else []
        while todo:
            name = todo.pop()
            if name in seen or name in constants:
                continue
            seen.add(name)
            if name in rows and rows[name]["xmodel_sqnr_db"] is not None:
                found.append(rows[name]["xmodel_sqnr_db"])
            elif name in producer:
                todo += list(producer[name].input)
        return found

    for tensor, row in rows.items():
        inputs = measured_inputs(producer.get(tensor))
        row["sqnr_drop_db"] = (round(min(inputs) - row["xmodel_sqnr_db"], 2)
                               if inputs and row["xmodel_sqnr_db"] is not None else None)
    ordered = sorted(rows.values(), key=lambda r: order.get(r["tensor"], -1))
    return ordered[:MAX_ROWS]
