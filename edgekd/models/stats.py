"""Parameters and MACs, counted by torch-pruning's tracer (not by hand)."""

from __future__ import annotations

import torch
from torch import nn


def count_params_macs(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(parameters, MACs for ONE sample). The example's batch size is reduced to 1."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            macs, params = tp.utils.count_ops_and_params(model, example[:1].contiguous())
    finally:
        model.train(was_training)
    return int(params), int(macs)
