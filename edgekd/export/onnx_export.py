"""ONNX export: the torch.export-based exporter, a TorchScript fallback, simplification, full check.

The result is ONE self-contained ``.onnx`` file: the torch.export-based exporter writes weights
to a separate ``.onnx.data`` file unless told otherwise, and a device team should get one file.
BatchNorm folding into the preceding convolution is confirmed on the final graph, because a
left-over BatchNormalization node is a sign the model was exported in training mode.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from edgekd.errors import StageError
from edgekd.export.prepare import eval_on_cpu, example_for, one_line, quiet_exporters
from edgekd.fileio import atomic_path

#: the torch.export-based exporter emits this opset or newer; older opsets need the TorchScript exporter
DYNAMO_MIN_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"


class ExporterFallbackWarning(UserWarning):
    """The torch.export-based ONNX exporter failed and the TorchScript exporter was used instead."""


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic_batch: bool) -> None:
    dynamic_shapes = ({0: torch.export.Dim(BATCH_DIM)},) if dynamic_batch else None
    torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=opset, external_data=False,
                      dynamic_shapes=dynamic_shapes, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      optimize=True, verbose=False, report=False)


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, opset: int,
                        dynamic_batch: bool) -> None:
    dynamic_axes = {INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}} if dynamic_batch else None
    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes,
                      do_constant_folding=True)


def _simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(proto)


def graph_facts(proto: onnx.ModelProto) -> dict[str, Any]:
    """Node counts, the op histogram and whether every Conv-BatchNorm pair was folded."""
    ops = Counter(node.op_type for node in proto.graph.node)
    conv_outputs = {out for node in proto.graph.node if node.op_type == "Conv" for out in node.output}
    unfused = sum(1 for node in proto.graph.node
                  if node.op_type == "BatchNormalization" and node.input and node.input[0] in conv_outputs)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "nodes": len(proto.graph.node),
        "op_types": dict(sorted(ops.items())),
        "batchnorm_nodes": ops.get("BatchNormalization", 0),
        "unfused_conv_bn": unfused,
        "has_batchnorm": ops.get("BatchNormalization", 0) > 0,
        "opset": opset,
        "initializers": len(proto.graph.initializer),
    }


def check_onnx_file(path: Path) -> None:
    """``onnx.checker`` with ``full_check`` (strict shape inference); a failure is a ``StageError``."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise StageError(f"onnx.checker rejected {path.name}: {one_line(exc)}",
                         hint="the exported graph is invalid; try another opset (export.opset)") from exc


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, *, opset: int = 18,
                dynamic_batch: bool = True, simplify: bool = True) -> dict[str, Any]:
    """Export ``model`` to one self-contained, checked ``.onnx`` file; return facts about it.

    The input is named ``input`` (batch axis ``batch`` when dynamic), the output ``logits``.
    Returns: exporter used (and why it fell back), opset, file size, node counts before and
    after simplification, op histogram, BatchNorm facts.
    """
    path = Path(path)
    info: dict[str, Any] = {"exporter": "torch.export", "fallback_reason": None, "opset_requested": opset,
                            "dynamic_batch": dynamic_batch, "input_name": INPUT_NAME, "output_name": OUTPUT_NAME}
    with eval_on_cpu(model) as net, atomic_path(path) as tmp:
        x = example_for(example, dynamic_batch)
        try:
            if opset < DYNAMO_MIN_OPSET:
                raise ValueError(f"it emits opset {DYNAMO_MIN_OPSET} or newer and opset {opset} was asked for")
            with quiet_exporters():
                _export_dynamo(net, x, tmp, opset, dynamic_batch)
        except Exception as exc:  # the exporter raises many types (export, lowering, onnxscript)
            info["exporter"], info["fallback_reason"] = "torchscript", one_line(exc)
            warnings.warn(f"the torch.export-based ONNX exporter cannot be used ({one_line(exc)}); "
                          "falling back to the TorchScript exporter", ExporterFallbackWarning, stacklevel=2)
            try:
                with quiet_exporters():
                    _export_torchscript(net, x, tmp, opset, dynamic_batch)
            except Exception as exc2:
                raise StageError(f"ONNX export failed with both exporters: torch.export: {info['fallback_reason']}; "
                                 f"TorchScript: {one_line(exc2)}",
                                 hint="make the model traceable (no data-dependent Python control flow), "
                                 "or try another opset") from exc2
        proto = onnx.load(str(tmp))
        info["nodes_exported"] = len(proto.graph.node)
        info["simplifier"] = None
        if simplify:
            try:
                proto = _simplify(proto)
                info["simplifier"] = "onnxslim"
            except Exception as exc:  # keep the exported graph; the report says why it was not simplified
                info["simplify_error"] = one_line(exc)
                warnings.warn(f"onnxslim could not simplify {path.name} ({one_line(exc)}); keeping the exported graph",
                              stacklevel=2)
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
        check_onnx_file(tmp)
        info.update(graph_facts(proto))
        if info["opset"] != opset:
            raise StageError(f"asked for ONNX opset {opset} but the {info['exporter']} exporter wrote opset "
                             f"{info['opset']}", hint=f"use opset {info['opset']} (export.opset)")
    info["file_bytes"] = path.stat().st_size
    info["checker"] = "onnx.checker full_check passed"
    return info
