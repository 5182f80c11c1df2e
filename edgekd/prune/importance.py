"""Which channels to remove: torch-pruning's importance criteria, by recipe name.

Taylor importance (|w * dL/dw|, Molchanov et al. 2019) reads gradients, so
``accumulate_taylor_gradients`` fills ``.grad`` from a few real training batches first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from edgekd.errors import StageError

ImportanceFactory = Callable[[], tp.importance.Importance]

#: recipe name -> criterion. Group variants score a channel over every layer it couples
#: (conv out + BN + next conv in), which is what removing it actually removes.
IMPORTANCE: dict[str, ImportanceFactory] = {
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "bn_scale": tp.importance.BNScaleImportance,
    "lamp": lambda: tp.importance.LAMPImportance(p=2),
    "taylor": tp.importance.GroupTaylorImportance,
    "random": tp.importance.RandomImportance,
}

#: criteria that need ``accumulate_taylor_gradients`` before each pruning step
NEEDS_GRADIENTS = frozenset({"taylor"})
#: criteria that score only BatchNorm scales: groups without a BatchNorm are not pruned by them
NEEDS_BATCHNORM = frozenset({"bn_scale"})


def build_importance(name: str) -> tp.importance.Importance:
    return IMPORTANCE[name]()


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def accumulate_taylor_gradients(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                                max_batches: int) -> int:
    """Sum cross-entropy gradients over up to ``max_batches`` (x, y) batches into ``.grad``.

    Runs in eval mode so BatchNorm statistics are not changed by this probe. Returns the number
    of batches used.
    """
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    used = 0
    try:
        with torch.enable_grad():
            for x, y in batches:
                if used >= max_batches:
                    break
                # .contiguous(): torch 2.13 CPU backward crashed on non-contiguous batches (DESIGN.md)
                loss = F.cross_entropy(model(x.contiguous()), y)
                loss.backward()
                used += 1
    finally:
        model.train(was_training)
    if used == 0:
        raise StageError("Taylor importance needs training batches, but the data gave none",
                         hint="use another importance criterion or check the dataset")
    # A parameter outside the loss path (unused branch) gets zeros so the criterion can read it.
    for param in model.parameters():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    return used
