"""MobileNetV2 (Sandler et al. 2018) for small images: stride-1 stem and fewer downsamplings,
so 32x32 inputs keep a 4x4 map before pooling. Depthwise convolutions are ``groups=channels``.
"""

from __future__ import annotations

from torch import Tensor, nn


def _make_divisible(value: float, divisor: int = 8) -> int:
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.use_residual = stride == 1 and inp == out
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion, channels, repeats, stride) — CIFAR variant: first two downsamplings removed
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int, in_channels: int = 3, width_mult: float = 1.0, last_channel: int = 1280):
        super().__init__()
        inp = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(last_channel * max(1.0, width_mult))
        features: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, inp, 3, 1, 1, bias=False),
                                                   nn.BatchNorm2d(inp), nn.ReLU6(inplace=True))]
        for expand, channels, repeats, stride in self.SETTINGS:
            out = _make_divisible(channels * width_mult)
            for i in range(repeats):
                features.append(InvertedResidual(inp, out, stride if i == 0 else 1, expand))
                inp = out
        features.append(nn.Sequential(nn.Conv2d(inp, self.last_channel, 1, bias=False),
                                      nn.BatchNorm2d(self.last_channel), nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))
