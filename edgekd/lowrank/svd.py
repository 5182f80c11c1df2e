"""Truncated SVD of a layer's weight, arranged as the two factors of a factorized layer.

Every function returns ``(first, second)`` weights whose composition is the best rank-r
approximation of the layer (Eckart-Young, in the Frobenius norm of the reshaped weight); the square
root of each singular value goes into both factors so neither factor's scale dwarfs the other's
(balanced factors train and quantize better than U·S with V). The SVD runs in float64 on the CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.linalg.svd(matrix.detach().to("cpu", torch.float64), full_matrices=False)


def singular_values(matrix: Tensor) -> Tensor:
    """Singular values of a 2-D matrix, descending (float64, CPU)."""
    return torch.linalg.svdvals(matrix.detach().to("cpu", torch.float64))


def energy_kept(values: Tensor, rank: int) -> float:
    """Share of the singular-value energy (sum of squares) in the first ``rank`` values, in [0, 1]."""
    total = float((values ** 2).sum())
    return 1.0 if total == 0.0 else float((values[:rank] ** 2).sum()) / total


def rank_for_energy(values: Tensor, energy: float) -> int:
    """The smallest rank whose kept energy is at least ``energy`` (in (0, 1]); at least 1."""
    total = float((values ** 2).sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(values ** 2, 0) / total
    # a tolerance so that energy=1.0 is met by the full rank despite rounding in the cumulative sum
    return max(1, int((cumulative < energy - 1e-12).sum()) + 1) if energy < 1.0 else len(values)


def _split(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """matrix (m, n) ≈ left (m, r) @ right (r, n)."""
    u, s, vh = _svd(matrix)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def linear_matrix(weight: Tensor) -> Tensor:
    """A Linear weight (out, in) is its own matrix."""
    return weight


def linear_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Linear (out, in) -> first (r, in), second (out, r)."""
    left, right = _split(weight, rank)
    return right, left


def channel_matrix(weight: Tensor) -> Tensor:
    """A conv weight (out, in, *k) as (out, in·k)."""
    return weight.reshape(weight.shape[0], -1)


def channel_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """ConvNd (out, in, *k) -> first (r, in, *k), second 1x1 (out, r, 1, ...)."""
    left, right = _split(channel_matrix(weight), rank)
    ones = (1,) * (weight.dim() - 2)
    return right.reshape(rank, *weight.shape[1:]), left.reshape(weight.shape[0], rank, *ones)


def spatial_matrix(weight: Tensor) -> Tensor:
    """A Conv2d weight (out, in, kh, kw) as M[(i, h), (o, w)] = W[o, i, h, w], shaped (in·kh, out·kw)."""
    out_c, in_c, kh, kw = weight.shape
    return weight.permute(1, 2, 0, 3).reshape(in_c * kh, out_c * kw)


def spatial_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Conv2d (out, in, kh, kw) -> first (r, in, kh, 1), second (out, r, 1, kw)."""
    out_c, in_c, kh, kw = weight.shape
    left, right = _split(spatial_matrix(weight), rank)
    first = left.T.reshape(rank, in_c, kh, 1)
    second = right.reshape(rank, out_c, kw).permute(1, 0, 2).reshape(out_c, rank, 1, kw)
    return first, second
