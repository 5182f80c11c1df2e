"""A linear student: one ``nn.Linear`` over the flattened input (softmax regression).

The smallest student there is, and the classic distillation example: an MLP teacher taught into a
linear model (``recipes/mlp_to_linear.yaml``). The MNIST-1D paper reports 32% test top-1
for logistic regression trained on the labels alone.
"""

from __future__ import annotations

from torch import Tensor, nn


class LinearClassifier(nn.Module):
    """Logits = W · flatten(x) + b.

    Input: a batch shaped (N, *input_shape), any float dtype the weights have; output (N, num_classes).
    ``head`` is the single layer (named like the MLP's classifier, so prune/distill treat it as one).
    """

    def __init__(self, num_classes: int, in_features: int) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1:
            raise ValueError(f"in_features ({in_features}) and num_classes ({num_classes}) must be positive")
        self.flatten = nn.Flatten()
        self.head = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.flatten(x))
