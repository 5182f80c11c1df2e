"""User factories used by tests (as a user's own package would provide them)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


def digits_datasets(n: int = 200):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:n], dtype=torch.float32) / 16.0
    y = torch.tensor(d.target[:n])
    cut = int(n * 0.75)
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


class DictOutputNet(nn.Module):
    """A model whose forward returns a dict, like many research codebases."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return {"logits": self.head(h), "features": h}


class _Output:
    def __init__(self, logits):
        self.logits = logits


class HFStyleNet(DictOutputNet):
    """Returns an object with ``.logits``, as Hugging Face models do."""

    def forward(self, x):
        return _Output(super().forward(x)["logits"])


def dict_net(num_classes: int = 10, input_shape=(1, 8, 8), width: int = 16) -> nn.Module:
    return DictOutputNet(num_classes, input_shape[0], width)


def hf_net(num_classes: int = 10, input_shape=(1, 8, 8)) -> nn.Module:
    return HFStyleNet(num_classes, input_shape[0])
