"""One output adapter: whatever a model's forward returns, the pipeline sees a logits tensor.

Hugging Face models return objects with ``.logits``; others return dicts or tuples. Wrapping
once here keeps every stage (pruning traces, KD losses, ONNX export) free of such cases.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from edgekd.errors import ModelError


def logits_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits") and isinstance(output.logits, Tensor):
        return output.logits
    if isinstance(output, Mapping):
        if "logits" in output:
            return output["logits"]
        tensors = [v for v in output.values() if isinstance(v, Tensor)]
        if tensors:
            return tensors[0]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ModelError(
        f"cannot find logits in a model output of type {type(output).__name__}",
        hint="return a tensor, a tuple whose first item is the logits, a dict with 'logits', or an object with .logits",
    )


class LogitsAdapter(nn.Module):
    """Wraps a model whose forward does not return a plain tensor. State-dict keys gain ``model.``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return logits_of(self.model(x))


def adapt(model: nn.Module, example: Tensor) -> nn.Module:
    """Return ``model`` itself when it already yields a tensor, else a ``LogitsAdapter`` around it."""
    was_training = model.training
    model.eval()
    import torch

    with torch.no_grad():
        out = model(example)
    model.train(was_training)
    return model if isinstance(out, Tensor) else LogitsAdapter(model)
