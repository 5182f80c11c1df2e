"""Built-in architectures, by name, and user factories (``package.module:function``).

Every builder takes ``num_classes`` and ``input_shape`` (one sample, channels first) so a
recipe never has to repeat what the data already says.
"""

from __future__ import annotations

import difflib
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from edgekd.errors import ModelError
from edgekd.models.linear import LinearClassifier
from edgekd.models.mobilenetv2 import MobileNetV2
from edgekd.models.resnet_cifar import CifarResNet
from edgekd.models.small import MLP, ConvNet1D, TinyViT
from edgekd.registry import Registry

Builder = Callable[..., nn.Module]


def _resnet(depth: int) -> Builder:
    def build(num_classes: int, input_shape: tuple[int, ...], **kw: Any) -> nn.Module:
        return CifarResNet(depth, num_classes, in_channels=input_shape[0], **kw)

    return build


def _mobilenetv2(num_classes: int, input_shape: tuple[int, ...], **kw: Any) -> nn.Module:
    return MobileNetV2(num_classes, in_channels=input_shape[0], **kw)


def _cnn1d(num_classes: int, input_shape: tuple[int, ...], **kw: Any) -> nn.Module:
    if len(input_shape) != 2:
        raise ModelError(f"cnn1d expects 1-D samples shaped (channels, length), got {tuple(input_shape)}")
    return ConvNet1D(num_classes, in_channels=input_shape[0], length=input_shape[1], **kw)


def _mlp(num_classes: int, input_shape: tuple[int, ...], **kw: Any) -> nn.Module:
    return MLP(num_classes, in_features=math.prod(input_shape), **kw)


def _linear(num_classes: int, input_shape: tuple[int, ...], **kw: Any) -> nn.Module:
    return LinearClassifier(num_classes, in_features=math.prod(input_shape), **kw)


def _vit_tiny(num_classes: int, input_shape: tuple[int, ...], **kw: Any) -> nn.Module:
    if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
        raise ModelError(f"vit_tiny expects square images shaped (C, H, W), got {tuple(input_shape)}")
    return TinyViT(num_classes, in_channels=input_shape[0], image_size=input_shape[1], **kw)


@dataclass(frozen=True)
class ModelEntry:
    """A built-in architecture: ``build(num_classes, input_shape, **kwargs) -> nn.Module``;
    ``example_shape``: one sample shape (channels first) it accepts, which the coverage tests feed it."""

    name: str
    build: Builder
    example_shape: tuple[int, ...]
    summary: str


BUILTIN_MODELS: Registry[ModelEntry] = Registry("model", [
    ModelEntry("resnet20", _resnet(20), (1, 16, 16), "CIFAR ResNet-20 (He et al. 2016), kwargs: width"),
    ModelEntry("resnet56", _resnet(56), (1, 16, 16), "CIFAR ResNet-56"),
    ModelEntry("mobilenetv2", _mobilenetv2, (3, 16, 16), "MobileNetV2 (Sandler et al. 2018), kwargs: width_mult"),
    ModelEntry("cnn1d", _cnn1d, (1, 40), "1-D CNN for signals such as MNIST-1D"),
    ModelEntry("mlp", _mlp, (1, 40), "MLP over the flattened input (MNIST-1D paper: 2 x 256)"),
    ModelEntry("linear", _linear, (1, 40), "one Linear layer over the flattened input (softmax regression)"),
    ModelEntry("vit_tiny", _vit_tiny, (1, 16, 16), "a tiny ViT (Dosovitskiy et al. 2021) for square images"),
])


def unknown_name_hint(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    suggestion = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"{suggestion}valid choices: {', '.join(choices)}"


def resolve_factory(path: str) -> Callable[..., Any]:
    """Import ``package.module:function``. This is the only user code a recipe can run, by name."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"factory {path!r} is not of the form 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"cannot import module {module_name!r} for factory {path!r}: {exc}",
                         hint="make sure the package is installed or on PYTHONPATH") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        names = [n for n in dir(module) if not n.startswith("_")]
        raise ModelError(f"module {module_name!r} has no attribute {attr!r}",
                         hint=unknown_name_hint(attr, names)) from None


def build_model(name: str, num_classes: int, input_shape: tuple[int, ...], **kwargs: Any) -> nn.Module:
    try:
        builder = BUILTIN_MODELS[name].build
    except KeyError:
        raise ModelError(f"unknown model {name!r}", hint=unknown_name_hint(name, list(BUILTIN_MODELS))) from None
    try:
        return builder(num_classes, tuple(input_shape), **kwargs)
    except TypeError as exc:
        raise ModelError(f"bad arguments for model {name!r}: {exc}") from exc
