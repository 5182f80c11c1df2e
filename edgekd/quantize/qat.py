"""Quantization-aware training with distillation, exported to QDQ ONNX.

1. Capture the student with ``torch.export`` and insert fake-quantizers with the XNNPACK
   quantizer's QAT config (PT2E): conv-BN folding is simulated, weights per-channel symmetric.
2. Initialise the observers on real training samples.
3. Train through the project's trainer (``fit``) with the distillation objective: the teacher's
   softened logits are the target, blended with the hard labels.
4. Convert (real Q/DQ ops), export with the torch.export-based ONNX exporter, and rewrite the
   signed activation Q/DQ pairs to unsigned ones (exact; ORT's fast x86 kernels want u8
   activations, see ``graph.unsigned_activations``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import torch
from torch import nn

from edgekd.errors import StageError
from edgekd.export.onnx_export import check_onnx_file
from edgekd.fileio import atomic_path
from edgekd.quantize.calibration import batches, calibration_samples
from edgekd.quantize.config import QatMethod
from edgekd.quantize.executorch_quant import export_program, require_executorch, xnnpack_quantizer
from edgekd.quantize.graph import unsigned_activations

if TYPE_CHECKING:
    from edgekd.quantize.methods import QuantizeJob

#: the captured graph keeps a dynamic batch up to this (training and validation batches)
QAT_MAX_BATCH = 4096


def resolve_reduce_range(setting: bool | str) -> bool:
    from edgekd.quantize.ort_static import cpu_has_vnni

    return cpu_has_vnni() is False if setting == "auto" else bool(setting)


class QatModule(nn.Module):
    """The prepared PT2E graph as an ordinary module for the trainer.

    An exported graph's own ``.train()``/``.eval()`` (as allowed by torchao) switch its BatchNorm
    and dropout ops but return None, which breaks ``model.eval()(x)`` chains; ``nn.Module.train``
    on this wrapper calls them on the child and returns the wrapper.
    """

    def __init__(self, graph: torch.fx.GraphModule) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)


def prepare_qat(model: nn.Module, samples: torch.Tensor, *, per_channel: bool, reduce_range: bool,
                batch_size: int) -> QatModule:
    """The student as a trainable PT2E graph with fake-quantizers whose ranges start from real data."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    example = samples[:2].contiguous()
    with torch.backends.mkldnn.flags(enabled=False), torch.backends.nnpack.flags(enabled=False):
        captured = export_program(copy.deepcopy(model).cpu().eval(), example, QAT_MAX_BATCH).module()
    prepared = prepare_qat_pt2e(captured, xnnpack_quantizer(per_channel=per_channel, qat=True,
                                                            reduce_range=reduce_range))
    # the trainer calls .train()/.eval(); on an exported graph that switches BatchNorm and dropout ops
    allow_exported_model_train_eval(prepared)
    module = QatModule(prepared).eval()
    with torch.no_grad():
        for batch in batches(samples, batch_size):
            module(torch.from_numpy(batch))
    return module


def export_qdq_onnx(converted: torch.fx.GraphModule, example: torch.Tensor, path: Path, opset: int = 18) -> Path:
    """A converted PT2E graph as one self-contained QDQ ``.onnx`` with unsigned activations."""
    from edgekd.export.onnx_export import INPUT_NAME, OUTPUT_NAME
    from edgekd.export.prepare import one_line, quiet_exporters

    batch = torch.export.Dim("batch", min=1, max=QAT_MAX_BATCH)
    try:
        with quiet_exporters():
            program = torch.onnx.export(converted, (example.contiguous(),), dynamo=True, opset_version=opset,
                                        dynamic_shapes=({0: batch},), input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], external_data=False, optimize=True,
                                        verbose=False, report=False)
    except Exception as exc:  # the exporter raises many types (export, lowering, onnxscript)
        raise StageError(f"exporting the QAT model to ONNX failed: {one_line(exc)}") from exc
    proto = program.model_proto
    for node in proto.graph.node:
        # the exporter annotates every node with its Python stack trace: 3/4 of a small model's bytes
        del node.metadata_props[:]
    if unsigned_activations(proto) == 0:
        raise StageError("the QAT export has no activation QuantizeLinear/DequantizeLinear pairs",
                         hint="the XNNPACK quantizer annotated no operator of this model")
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
        check_onnx_file(tmp)  # full check, as for every ONNX file edgekd writes
    return path


def qat_build(method: QatMethod, job: QuantizeJob, out: Path) -> Path:
    """Fake-quantized distillation training of the student, then its QDQ ONNX file at ``out``."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from edgekd.distill.config import KDTerm
    from edgekd.distill.objective import DistillObjective
    from edgekd.train.config import TrainConfig
    from edgekd.train.trainer import fit

    if job.teacher is None:
        raise StageError("QAT with distillation needs the teacher as its target")
    require_executorch()
    cal = method.calibration
    samples = calibration_samples(job.data, cal.samples, cal.seed, key="method.calibration.samples")
    prepared = prepare_qat(job.student, samples, per_channel=method.per_channel,
                           reduce_range=resolve_reduce_range(method.reduce_range), batch_size=cal.batch_size)
    train_config = TrainConfig(**method.model_dump(include=set(TrainConfig.model_fields)))
    objective = DistillObjective(job.teacher, [KDTerm(kind="kd")], temperature=method.temperature,
                                 alpha=method.alpha)
    fit(prepared, objective, job.data, train_config, job.workdir / "qat", device=job.device, resume=job.resume,
        label="qat", seed=job.seed)
    prepared.cpu().eval()
    converted = convert_pt2e(prepared.graph)
    return export_qdq_onnx(converted, job.data.example_batch(2), out)
