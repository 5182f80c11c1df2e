"""Models of issue 14's recovery cases, as recipe factories ``tests.recovery_models:NAME``.

The MobileNetV2 case uses ``tests.zoo_models:hf_mobilenet_v2``; the ResNet-18 one is here: Hugging
Face's ``ResNetConfig`` with basic blocks, depths 2-2-2-2 and widths 64-128-256-512 builds
torchvision's ResNet-18 (the issue's "pruned 50%: 92% after pruning, 10% after one distillation
epoch" student). Built offline from the config, no weights downloaded. ``tools/check_recovery.py``
runs both cases.
"""

from __future__ import annotations

import torch
from torch import nn

Shape = tuple[int, ...]
DIGITS32: Shape = (1, 32, 32)


def hf_resnet18(num_classes: int = 10, input_shape: Shape = DIGITS32) -> nn.Module:
    """ResNet-18 (basic blocks, depths 2-2-2-2, widths 64-128-256-512, 64-channel stem) from Hugging Face
    transformers, with ``input_shape[0]`` input channels; about 11 M parameters."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ResNetConfig(num_labels=num_classes, num_channels=input_shape[0], depths=[2, 2, 2, 2],
                                       hidden_sizes=[64, 128, 256, 512], layer_type="basic", embedding_size=64)
    return transformers.ResNetForImageClassification(config)
