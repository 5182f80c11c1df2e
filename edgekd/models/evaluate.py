"""Top-1 accuracy of a PyTorch model on tensors (percent)."""

from __future__ import annotations

import torch
from torch import nn

from edgekd.models.adapter import logits_of


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256,
                   device: torch.device | None = None) -> torch.Tensor:
    """Eval-mode logits ``(N, classes)`` of ``x`` (N, ...) as float32 on the CPU, ``batch_size`` at a
    time; the model's mode is restored. Works on an unadapted model too (``logits_of``)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [logits_of(model(x[i:i + batch_size].to(device).contiguous())).float().cpu()
           for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out)


def top1_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256,
                  device: torch.device | None = None) -> float:
    logits = predict_logits(model, x, batch_size=batch_size, device=device)
    return 100.0 * (logits.argmax(1) == y).float().mean().item()
