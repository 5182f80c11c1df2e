"""The divergence guard of ``fit``: detect a diverging step or epoch and undo it with a lower lr.

What counts as diverged (``GuardConfig`` holds the thresholds):

- a step: the loss is not finite, or above ``explode_factor`` x max(the run's first loss, ln C)
  (ln C is the cross-entropy of a uniform guess, so a small first loss does not make every later
  wobble an explosion);
- an epoch: train accuracy at chance while the loss is not falling (the model does not learn, as
  a pruned MobileNetV2 whose train accuracy sat at 10-12% did not), a mean train loss above
  ``rise_factor`` x max(the run's first loss, ln C) (training made the model worse than where it
  started and worse than a uniform guess: a Hugging Face MobileNetV2 trained from scratch with SGD
  at lr 0.05 went 2.51 (first step) -> 2.50, 2.85, 2.58, 3.74, 3.41 and ended at 41% val, where lr
  0.01 reaches 84%; no single step exploded and train accuracy stayed above chance at 19-27%, so
  nothing else caught it), or val accuracy more than ``max_drop_from_start`` points
  below the starting model's when that model was above chance (recovery training that destroys
  what it recovers: a pruned ResNet-18 went from 92% to 10% in its first distillation epoch).

A rollback restores the end of the last good epoch (weights, objective helpers, schedule step,
loss scaler, RNG state: exactly what ``last.pt`` holds), clears the optimizer's moments and
scales every lr by ``lr_factor``; the epoch is then trained again. A resumed run replays the same
path: it reloads the same good epoch, diverges at the same step and rolls back the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgekd.train.config import GuardConfig


class Diverged(Exception):  # noqa: N818 - a signal inside fit, never raised to a caller
    """Raised inside the training loop; ``fit`` rolls back (or gives up with ``TrainingDivergedError``)."""

    def __init__(self, reason: str, **facts: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.facts = facts


@dataclass
class Snapshot:
    """The end of the last good epoch, kept in memory (CPU copies) for a rollback."""

    model: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor] | None
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    rng: dict[str, Any] = field(default_factory=dict)


def chance(num_classes: int) -> float:
    """Top-1 percent of a uniform guess."""
    return 100.0 / max(num_classes, 1)


def at_chance(accuracy: float, num_classes: int, margin: float) -> bool:
    """``accuracy`` (percent) is no better than guessing, up to ``margin`` of the way to 100%."""
    c = chance(num_classes)
    return accuracy <= c + margin * (100.0 - c)


def kept_share(after: float, before: float, chance: float) -> float:
    """The share of a reference model's accuracy above chance that another keeps (percent in, a ratio out: the
    pruned student against the unpruned one or the teacher; 1.0 when the reference is not above chance, where
    there was nothing to keep)."""
    return 1.0 if before <= chance else (after - chance) / (before - chance)


def learned(accuracy: float, num_classes: int) -> bool:
    """``accuracy`` is at least half-way from chance to 100%: 'training accuracy is high'."""
    c = chance(num_classes)
    return accuracy >= c + 0.5 * (100.0 - c)


def step_problem(loss: float, reference: float | None, num_classes: int, guard: GuardConfig) -> str | None:
    """Why one step's loss (averaged over ranks) counts as diverged, or None."""
    if not math.isfinite(loss):
        return f"the loss became {loss}"
    if reference is not None:
        limit = guard.explode_factor * max(reference, math.log(max(num_classes, 2)))
        if loss > limit:
            return f"the loss exploded to {loss:.4g} (> {guard.explode_factor:g} x {limit / guard.explode_factor:.4g})"
    return None


def val_noise(accuracy: float, samples: int) -> float:
    """Two standard errors (percentage points) of a top-1 reading of ``accuracy`` % on ``samples`` samples
    (binomial): how far two readings of the same model's quality can differ by which samples it happens to
    get right. 24% on 240 samples: 5.5 points; 98% on 269: 1.7."""
    p = min(max(accuracy / 100.0, 0.0), 1.0)
    return 200.0 * math.sqrt(p * (1.0 - p) / max(samples, 1))


def epoch_problem(train_accuracy: float, val_accuracy: float, start_accuracy: float | None, num_classes: int,
                  guard: GuardConfig, train_loss: float | None = None,
                  reference_loss: float | None = None, steps: int | None = None,
                  val_samples: int | None = None, from_weights: bool = False) -> str | None:
    """Why a finished epoch counts as diverged, or None (train accuracy NaN: no labeled samples).

    A mean ``train_loss`` above ``guard.rise_factor`` x max(``reference_loss``, ln C) counts whatever the
    accuracy (``rise_factor`` None: off); ln C keeps a student that starts with a loss near 0 from
    counting noise as a rise. Only from random weights (``from_weights`` False), where the first loss is
    about ln C whatever the batch: from trained weights the first step's loss is one batch's reading of a
    trained model, not a scale (a pruned Hugging Face MobileNetV2 distilled at T=4 read 3.97 on its first
    batch and 5.1-5.8 as the first epoch's mean at every lr down to 0.0008, where the weights barely move,
    and the run stopped after three rollbacks); such a run is judged by its val drop from the start.

    Train accuracy at chance counts only when the epoch's mean loss is not at least 10% below the run's
    first loss: a heavily pruned student may sit at chance for a warm-up epoch while its loss falls,
    and lowering its lr then would only slow it down; nor before ``guard.chance_after_steps`` steps
    (``steps``: optimizer steps since the start or the last rollback).

    A val drop below the start counts when it exceeds ``guard.max_drop_from_start`` and, given
    ``val_samples``, the reading's noise (``val_noise``): a weak starting model on a small val split
    reads several points apart from one epoch to the next without getting worse."""
    stalled = train_loss is None or reference_loss is None or not train_loss < 0.9 * reference_loss
    enough = steps is None or steps >= guard.chance_after_steps
    if not math.isnan(train_accuracy) and stalled and enough and at_chance(train_accuracy, num_classes, guard.chance_margin):
        return f"train accuracy {train_accuracy:.2f}% is at chance ({chance(num_classes):.1f}%) and the loss is not falling"
    if not from_weights and train_loss is not None and reference_loss is not None and guard.rise_factor is not None:
        floor = max(reference_loss, math.log(max(num_classes, 2)))
        if not train_loss <= guard.rise_factor * floor:  # NaN counts as risen
            return (f"the epoch's mean train loss {train_loss:.4g} rose above {guard.rise_factor:g} x "
                    f"{floor:.4g} (the first loss, or ln {num_classes} if larger): the lr is too high to learn")
    alive_start = start_accuracy is not None and not at_chance(start_accuracy, num_classes, guard.chance_margin)
    if alive_start and guard.max_drop_from_start is not None:
        allowed = max(guard.max_drop_from_start, val_noise(start_accuracy, val_samples) if val_samples else 0.0)
        if val_accuracy < start_accuracy - allowed:
            return (f"val accuracy fell to {val_accuracy:.2f}% from {start_accuracy:.2f}% at the start "
                    f"(more than {allowed:.3g} points)")
    return None


def take_snapshot(model: nn.Module, extra: nn.Module | None, scheduler, scaler, rng: dict[str, Any]) -> Snapshot:
    def copy(module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    return Snapshot(model=copy(model), extra=copy(extra) if extra is not None else None,
                    scheduler=dict(scheduler.state_dict()), scaler=dict(scaler.state_dict()), rng=rng)


def roll_back(snapshot: Snapshot, model: nn.Module, extra: nn.Module | None, optimizer: torch.optim.Optimizer,
              scheduler, scaler, lr_factor: float) -> list[float]:
    """Restore ``snapshot``, clear the optimizer's moments, scale every lr by ``lr_factor``. Returns the
    new peak lrs. The caller restores the RNG state (the trainer owns its format)."""
    lowered = [base * lr_factor for base in scheduler.base_lrs]  # compounding over earlier rollbacks
    model.load_state_dict(snapshot.model)
    if extra is not None and snapshot.extra is not None:
        extra.load_state_dict(snapshot.extra)
    optimizer.state.clear()  # momentum / Adam moments carry the divergence; start them afresh
    scheduler.load_state_dict(snapshot.scheduler)
    scaler.load_state_dict(snapshot.scaler)
    scheduler.base_lrs = lowered
    for group, base, multiplier in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas,
                                       strict=True):
        group["lr"] = base * multiplier(scheduler.last_epoch)
    return list(scheduler.base_lrs)
