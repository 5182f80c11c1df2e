"""ExecuTorch 8-bit: PT2E quantization with the XNNPACK quantizer, lowered to an XNNPACK ``.pte``.

The flow is ExecuTorch's own: ``torch.export`` → ``prepare_pt2e`` (observers) → real calibration
samples → ``convert_pt2e`` → ``to_edge_transform_and_lower`` with the XNNPACK partitioner. The
batch dimension stays dynamic so one program serves batch 1 and batch 32.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path

import torch
from torch import nn

from edgekd.errors import RuntimeUnavailableError, StageError
from edgekd.quantize.calibration import batches

#: ExecuTorch plans memory for the largest batch, so the bound is kept to what the stage feeds
DEFAULT_MAX_BATCH = 64


def require_executorch() -> None:
    """Raise a one-line ``RuntimeUnavailableError`` when ExecuTorch (or torchao) cannot be imported."""
    for module in ("executorch.exir", "executorch.backends.xnnpack.quantizer.xnnpack_quantizer",
                   "torchao.quantization.pt2e.quantize_pt2e"):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise RuntimeUnavailableError(
                f"ExecuTorch 8-bit quantization needs {module.split('.')[0]}, which is not installed ({exc})",
                hint="pip install executorch (it brings torchao), or use method: ort_static") from exc


def export_program(model: nn.Module, example: torch.Tensor, max_batch: int = DEFAULT_MAX_BATCH
                   ) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch of 1..``max_batch``; a capture failure names the cause."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    try:
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # torch.export raises many types (Unsupported, UserError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageError(f"torch.export could not capture the model for ExecuTorch: {first}",
                         hint="an operator or Python control flow in forward() is not exportable; "
                              "see torch.export's message above") from exc


def xnnpack_quantizer(*, per_channel: bool, qat: bool = False, reduce_range: bool = False):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    # 7-bit weights (reduce_range) keep u8 x s8 products from saturating on CPUs without VNNI
    qmax = 63 if reduce_range else 127
    config = get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=qat,
                                               weight_qmin=-qmax, weight_qmax=qmax)
    return XNNPACKQuantizer().set_global(config)


def quantize_pt2e(model: nn.Module, samples: torch.Tensor, *, per_channel: bool, batch_size: int,
                  max_batch: int = DEFAULT_MAX_BATCH) -> nn.Module:
    """PTQ: observers calibrated on real samples, then converted to quantize/dequantize ops."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example = samples[:2].contiguous()
    # PyTorch's CPU conv backend heuristics (oneDNN/NNPACK at batch >= 16) install a guard that
    # narrows the batch range to <= 15 while tracing; off while capturing (as the exporter does)
    with torch.backends.mkldnn.flags(enabled=False), torch.backends.nnpack.flags(enabled=False):
        captured = export_program(copy.deepcopy(model).eval(), example, max_batch).module()
    prepared = prepare_pt2e(captured, xnnpack_quantizer(per_channel=per_channel))
    with torch.no_grad():
        for batch in batches(samples, min(batch_size, max_batch)):
            prepared(torch.from_numpy(batch))
    return convert_pt2e(prepared)


def lower_to_pte(model: nn.Module, example: torch.Tensor, path: Path, max_batch: int = DEFAULT_MAX_BATCH) -> Path:
    """Lower a float or PT2E-quantized model to an XNNPACK ``.pte`` with the export stage's exporter."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    from edgekd.export.executorch_export import export_pte

    if isinstance(model, torch.fx.GraphModule):
        # a converted PT2E module refuses .eval() unless allowed; the exporter switches to eval mode
        allow_exported_model_train_eval(model)
    export_pte(model, example, path, dynamic_batch=True, max_batch=max_batch)
    return path
