"""The factorized layers the ``lowrank`` stage puts in place of a Linear or Conv layer.

Each is two plain torch layers in a row (``first`` then ``second``), so export (ONNX, ORT, ExecuTorch),
pruning (torch-pruning sees the rank as one more channel dimension), distillation hooks and INT8
quantization treat them like any other layers. Each class offers ``from_module(original)``, the
full-rank (exact) factorization, which is how a portable checkpoint rebuilds it: the checkpoint
records the class (``edgekd.models.portable.SWAPPABLE_MODULES``), the rank shows in the recorded
shapes, and the weights are loaded afterwards.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edgekd.lowrank.svd import channel_factors, linear_factors, spatial_factors


class LowRankLinear(nn.Module):
    """``Linear(in, out)`` as ``Linear(in, r, bias=False)`` then ``Linear(r, out)``.

    Input (..., in_features), output (..., out_features); MACs per row r·(in + out) instead of in·out.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    @classmethod
    def factorize(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """The rank-``rank`` truncated SVD of ``linear.weight`` (sqrt of the singular values in each factor)."""
        module = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None)
        a, b = linear_factors(linear.weight.detach(), rank)
        _copy(module, linear, a, b)
        return module

    @classmethod
    def from_module(cls, linear: nn.Linear) -> LowRankLinear:
        return cls.factorize(linear, min(linear.in_features, linear.out_features))


class ChannelLowRankConv(nn.Module):
    """``ConvNd(in, out, k)`` as ``ConvNd(in, r, k)`` (same stride/padding/dilation) then a 1x1 ``ConvNd(r, out)``.

    Channel SVD (Zhang et al. 2016; AIMET's channel pruning by SVD): W reshaped (out, in·k) is
    factored. Input (N, in, *spatial), output as the original's; MACs per output pixel r·(in·k + out).
    """

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, rank: int) -> None:
        super().__init__()
        conv_cls = type(conv)
        self.first = conv_cls(conv.in_channels, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                              dilation=conv.dilation, bias=False)
        self.second = conv_cls(rank, conv.out_channels, 1, bias=conv.bias is not None)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    @classmethod
    def factorize(cls, conv: nn.Conv1d | nn.Conv2d, rank: int) -> ChannelLowRankConv:
        module = cls(conv, rank)
        a, b = channel_factors(conv.weight.detach(), rank)
        _copy(module, conv, a, b)
        return module

    @classmethod
    def from_module(cls, conv: nn.Conv1d | nn.Conv2d) -> ChannelLowRankConv:
        w = conv.weight
        return cls.factorize(conv, min(w.shape[0], w[0].numel()))


class SpatialLowRankConv2d(nn.Module):
    """``Conv2d(in, out, kh×kw)`` as ``Conv2d(in, r, kh×1)`` then ``Conv2d(r, out, 1×kw)``.

    Spatial SVD (Jaderberg et al. 2014; AIMET's spatial SVD): W reshaped (in·kh, out·kw) is factored;
    the vertical conv takes the height stride/padding/dilation, the horizontal one the width's.
    Input (N, in, H, W), output as the original's.
    """

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        self.first = nn.Conv2d(conv.in_channels, rank, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1),
                               bias=False)
        self.second = nn.Conv2d(rank, conv.out_channels, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw),
                                bias=conv.bias is not None)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    @classmethod
    def factorize(cls, conv: nn.Conv2d, rank: int) -> SpatialLowRankConv2d:
        module = cls(conv, rank)
        a, b = spatial_factors(conv.weight.detach(), rank)
        _copy(module, conv, a, b)
        return module

    @classmethod
    def from_module(cls, conv: nn.Conv2d) -> SpatialLowRankConv2d:
        out_c, in_c, kh, kw = conv.weight.shape
        return cls.factorize(conv, min(in_c * kh, out_c * kw))


def _copy(module: nn.Module, original: nn.Module, first: Tensor, second: Tensor) -> None:
    """Load the factors (and the original's bias, on ``second``) in the original's dtype and device."""
    like = original.weight
    module.to(device=like.device, dtype=like.dtype)
    with torch.no_grad():
        module.first.weight.copy_(first.to(like.dtype))
        module.second.weight.copy_(second.to(like.dtype))
        if original.bias is not None:
            module.second.bias.copy_(original.bias.detach())
    module.train(original.training)


FACTORIZED = (LowRankLinear, ChannelLowRankConv, SpatialLowRankConv2d)
