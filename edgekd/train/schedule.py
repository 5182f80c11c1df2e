"""Optimizer and learning-rate schedule from a ``TrainConfig``.

Every schedule is a per-step multiplier of the peak lr (a ``LambdaLR``), so its checkpoint
state is just a step counter and resuming mid-run lands on exactly the same lr.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from edgekd.train.config import TrainConfig

#: warm-up starts at this fraction of the peak lr
WARMUP_START = 0.1
#: one-cycle (Smith 2018): start at lr/25, peak after 30% of the run, end at lr/1e4
ONECYCLE_START, ONECYCLE_PEAK_AT, ONECYCLE_END = 1 / 25, 0.3, 1e-4


def build_optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    # no weight decay on biases and norm scales (1-D tensors): decaying them only hurts small nets
    decay = [p for p in params if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in params if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    builders: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "sgd": lambda: torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                                       nesterov=config.momentum > 0),
        "adamw": lambda: torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, 0.999)),
    }
    return builders[config.optimizer]()


def lr_multiplier(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """step → lr / peak lr, for the configured schedule with linear warm-up."""
    total = max(config.epochs * steps_per_epoch, 1)
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total // 2)

    def warm(step: int) -> float | None:
        if step < warmup:
            return WARMUP_START + (1 - WARMUP_START) * step / warmup
        return None

    def cosine(step: int) -> float:
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def step_decay(step: int) -> float:
        return config.gamma ** (step // (config.step_size * steps_per_epoch))

    def onecycle(step: int) -> float:
        peak = max(warmup, int(ONECYCLE_PEAK_AT * total))
        if step < peak:
            return ONECYCLE_START + (1 - ONECYCLE_START) * step / max(peak, 1)
        progress = min((step - peak) / max(total - peak, 1), 1.0)
        return ONECYCLE_END + (1 - ONECYCLE_END) * 0.5 * (1 + math.cos(math.pi * progress))

    after_warmup: dict[str, Callable[[int], float]] = {
        "cosine": cosine, "step": step_decay, "constant": lambda step: 1.0,
    }
    if config.schedule == "onecycle":
        return onecycle  # has its own warm-up phase

    def multiplier(step: int) -> float:
        w = warm(step)
        return w if w is not None else after_warmup[config.schedule](step)

    return multiplier


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config, steps_per_epoch))
