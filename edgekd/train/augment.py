"""Random augmentation of training batches: shifts (images and 1-D signals) and horizontal flips.

Applied by the trainer to each mini-batch on the training device, after indexing, so the
``DataBundle`` stays a plain tensor dataset. The draws come from a generator seeded by
(seed, epoch, rank): a resumed run sees the same views as an uninterrupted one.

With distillation the teacher sees the same augmented view as the student ("consistent"
augmentation, Beyer et al. 2022), so the teacher-output cache is turned off: the cached logits
would belong to the un-augmented samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from edgekd.config_base import StrictModel
from edgekd.errors import ConfigError


class AugmentConfig(StrictModel):
    """``augment: {shift: 2}`` under a training block (the teacher's ``train``, ``finetune``, ``distill``)."""

    shift: int = Field(0, ge=0, le=32, description="random translation by up to this many pixels (1-D: samples) "
                                                   "along each spatial axis; edges are replicated")
    hflip: bool = Field(False, description="random horizontal flip, images only (wrong for digits and text)")

    @property
    def active(self) -> bool:
        return self.shift > 0 or self.hflip

    def summary(self) -> str:
        """In words for a report: "shift 3", "shift 2, hflip", "hflip"."""
        return ", ".join([f"shift {self.shift}"] * (self.shift > 0) + ["hflip"] * self.hflip)


def augment_generator(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch * 101 + rank)


def augment_batch(x: Tensor, config: AugmentConfig, generator: torch.Generator) -> Tensor:
    """A new batch: each sample shifted (and flipped) independently. ``x`` is (N, C, L) or (N, C, H, W)."""
    if x.dim() not in (3, 4):
        raise ConfigError(f"augment works on 1-D signals (N, C, L) or images (N, C, H, W), got shape "
                          f"{tuple(x.shape)}", hint="remove the augment block for this data")
    if config.hflip and x.dim() != 4:
        raise ConfigError("augment.hflip needs images (N, C, H, W); these samples are 1-D signals",
                          hint="drop hflip, keep shift")
    if config.shift > 0:
        x = _random_shift(x, config.shift, generator)
    if config.hflip:
        flip = torch.rand(len(x), generator=generator, device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


def _random_shift(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Pad by ``shift`` (replicating edges: zero is not the background of normalised data) and
    crop a window at a random offset per sample, with one ``gather`` per spatial axis."""
    n, c, *spatial = x.shape
    padded = F.pad(x, (shift, shift) * len(spatial), mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (n, len(spatial)), generator=generator, device=x.device)
    for axis, size in enumerate(spatial):
        dim = 2 + axis
        index = offsets[:, axis, None] + torch.arange(size, device=x.device)  # (N, size)
        view = [n, 1] + [1] * len(spatial)
        view[dim] = size
        target = list(padded.shape)
        target[dim] = size
        padded = padded.gather(dim, index.view(view).expand(target))
    return padded
