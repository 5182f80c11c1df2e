"""Put a model in the state every exporter needs: eval mode, on the CPU, and quiet.

Eval mode matters twice: BatchNorm must use its running statistics (so it folds into the
convolution) and Dropout must be off. Exports are made on the CPU because the deployment
targets are CPUs and the traced constants must not carry a CUDA device.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def eval_on_cpu(model: nn.Module) -> Iterator[nn.Module]:
    """Yield ``model`` in eval mode on the CPU (a copy when it lives elsewhere); restore its mode after."""
    on_cpu = all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    target = model if on_cpu else copy.deepcopy(model).cpu()
    was_training = model.training
    target.eval()
    try:
        yield target
    finally:
        model.train(was_training)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, for warnings where one line is enough."""
    text = (str(exc).strip().splitlines() or [""])[0] or type(exc).__name__
    return f"{type(exc).__name__}: {text[:limit]}"


def whole_cause(exc: BaseException, limit: int = 3000) -> str:
    """An exception's WHOLE message on one line (its lines joined by " | ", runs of spaces collapsed),
    for an artifact that failed: exporters put the operator and the user's source line after the
    first line ("mismatched dtypes:" | "Operator: aten.abs ... complex64" | "File ..., line 218")."""
    lines = [" ".join(line.split()) for line in str(exc).strip().splitlines() if line.strip()]
    text = " | ".join(lines) or type(exc).__name__
    if len(text) > limit:
        text = text[:limit] + f" ... ({len(text) - limit} more characters)"
    return f"{type(exc).__name__}: {text}"


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """Silence the exporters' chatter (missing-torchvision notices, deprecation warnings).

    Real failures still raise; only log records below ERROR and Future/Deprecation warnings are hidden.
    """
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript",
                                              "executorch", "torchao", "torch.utils._pytree",
                                              "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # deprecation notices point at the caller's frame, so they are silenced wherever they appear
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|onnxscript|executorch)")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def example_for(example: torch.Tensor, dynamic_batch: bool) -> torch.Tensor:
    """The tracing input: a fixed batch of 1, or at least 2 samples for a dynamic batch axis.

    torch.export specialises a dimension of size 0 or 1 to a constant, so a dynamic batch axis
    needs an example batch of at least two.
    """
    example = example.detach().cpu().float().contiguous()
    if not dynamic_batch:
        return example[:1].contiguous()
    if example.shape[0] >= 2:
        return example[:2].contiguous()
    return torch.cat([example, example]).contiguous()
