"""A few epochs of plain cross-entropy training, so test models have real weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def train_briefly(model: nn.Module, data, optimizer: torch.optim.Optimizer, epochs: int, *,
                  loader_seed: Callable[[int], int] = lambda epoch: epoch) -> nn.Module:
    """Train ``model`` in place on ``data``'s training split (batches of 64, shuffled with
    ``loader_seed(epoch)``); returns it in eval mode."""
    model.train()
    for epoch in range(epochs):
        for x, y in data.train_loader(64, seed=loader_seed(epoch)):
            loss = nn.functional.cross_entropy(model(x.contiguous()), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()
