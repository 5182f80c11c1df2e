"""Iterative pruning that keeps the student alive: after every step, BatchNorm recalibration and
the student's accuracy; between steps, a short recovery on the shared trainer.

One-shot pruning of 60% of the quickstart's ResNet-20 (width 40) leaves it at chance (13% val
after BatchNorm recalibration): its channels are about equally important, so each layer loses
information the next cannot make up, and the losses compound over 19 layers (docs/prune.md).
In steps (torch-pruning's linear schedule: 20%, 40%, 60% for three) the student relearns to use
the channels it keeps before the next cut; ``StepRecorder`` is the ``after_step`` callback of
``edgekd.prune.targets.prune_at_ratio`` that does this and records each step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from edgekd.data.bundle import DataBundle
from edgekd.errors import EdgekdError
from edgekd.models.batchnorm import recalibrate_batchnorm
from edgekd.models.evaluate import top1_accuracy
from edgekd.models.stats import count_params_macs
from edgekd.prune.config import PruneConfig, RecoveryConfig
from edgekd.train import distributed as dist_utils


def student_alive(model: nn.Module, x: torch.Tensor, accuracy: float, num_classes: int) -> dict[str, Any]:
    """Whether the pruned student still computes something: a finite forward on ``x`` and a val
    accuracy (percent) clearly above chance (more than 1.5x of 100 / classes). Never raises: the
    finding is data (``{"alive", "finite", "val_accuracy", "chance_accuracy"}`` and a ``note``)."""
    chance = 100.0 / max(1, num_classes)
    was_training = model.training
    try:
        with torch.no_grad():
            finite = bool(torch.isfinite(model.eval()(x)).all())
    except Exception:  # noqa: BLE001 - a forward that fails is as dead as one that is not finite
        finite = False
    finally:
        model.train(was_training)
    alive = finite and accuracy > 1.5 * chance
    verdict: dict[str, Any] = {"alive": alive, "finite": finite, "val_accuracy": round(accuracy, 3),
                               "chance_accuracy": round(chance, 3)}
    if not alive:
        verdict["note"] = ("the pruned student's forward is not finite" if not finite else
                           f"the pruned student is at chance ({accuracy:.1f}% vs {chance:.1f}%) after BatchNorm "
                           "recalibration: too much was cut at once, or a cut broke a coupling the tracer missed; "
                           "prune in steps with recovery between them (prune.steps: 3), lower the ratio, or add "
                           "the suspect layers to prune.ignored_layers")
    return verdict


def recovery_train_config(recovery: RecoveryConfig):
    """The ``DistillConfig`` (or ``FinetuneConfig``) the shared trainer runs for one recovery."""
    from edgekd.distill.config import DistillConfig, FinetuneConfig

    common = {"epochs": recovery.epochs, "lr": recovery.lr, "warmup_epochs": recovery.warmup_epochs,
              "grad_clip": recovery.grad_clip, "batch_size": recovery.batch_size}
    if recovery.objective == "distill":
        return DistillConfig(**common, temperature=recovery.temperature, alpha=recovery.alpha)
    return FinetuneConfig(**common)


@dataclass
class StepRecorder:
    """The ``after_step(model, step, steps, channel_ratio)`` callback of ``prune_at_ratio``.

    After each step: BatchNorm statistics re-estimated on ``config.bn_recalibration_batches``
    training batches, counted params/MACs, val top-1 and the alive check; after each step but the
    last, ``config.recovery`` training (``edgekd.train.trainer.fit``, checkpoints under
    ``workdir/step<k>``) and the val top-1 after it. ``rows`` holds one dict per step; a restart
    (step 1 again, after a broken group) clears them.

    Recovery needs every process under torchrun (the trainer wraps DDP) while pruning runs on rank
    0 only, so it is skipped there (``skipped`` says why).
    """

    config: PruneConfig
    data: DataBundle
    teacher: nn.Module
    workdir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    console: Console | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: str | None = None
    recalibrated: int = 0  # batches used after the last step

    def _batches(self, step: int):
        # step 1 reads the batches a one-shot prune always read (the recipe's seed)
        return self.data.train_loader(self.config.batch_size, seed=self.seed + 1000 * (step - 1))

    def __call__(self, model: nn.Module, step: int, steps: int, channel_ratio: float) -> None:
        if step == 1:
            self.rows.clear()
        self.recalibrated = recalibrate_batchnorm(model, self._batches(step), self.config.bn_recalibration_batches)
        model.eval()
        val_x, val_y = self.data.val_tensors()
        accuracy = top1_accuracy(model, val_x, val_y)
        params, macs = count_params_macs(model, val_x[:1])
        alive = student_alive(model, val_x[:64], accuracy, self.data.num_classes)
        row: dict[str, Any] = {"step": step, "channel_ratio": round(float(channel_ratio), 4), "params": params,
                               "macs": macs, "val_accuracy": round(accuracy, 3), "alive": alive["alive"],
                               "finite": alive["finite"]}
        if step < steps and self.config.recovery.epochs > 0:
            row["recovery"] = self._recover(model, step)
        self.rows.append(row)

    def _recover(self, model: nn.Module, step: int) -> dict[str, Any]:
        recovery = self.config.recovery
        if dist_utils.world_size() > 1:
            self.skipped = ("recovery between steps is skipped under torchrun (pruning runs on rank 0 only); "
                            "BatchNorm was recalibrated after each step")
            return {"skipped": self.skipped}
        from edgekd.distill.objective import DistillObjective
        from edgekd.train.objectives import CrossEntropyObjective
        from edgekd.train.trainer import fit

        train_config = recovery_train_config(recovery)
        objective = (DistillObjective.from_config(self.teacher, train_config) if recovery.objective == "distill"
                     else CrossEntropyObjective())
        saved = copy.deepcopy(model.state_dict())
        record: dict[str, Any] = {"objective": recovery.objective, "epochs": recovery.epochs, "lr": recovery.lr}
        try:
            result = fit(model, objective, self.data, train_config.concrete(True), self.workdir / f"step{step}",
                         device=self.device, label=f"prune step {step} recovery", seed=self.seed + step,
                         console=self.console, from_weights=True)
        except EdgekdError as exc:  # the guard gave up: keep the pruned weights, the next stage recovers
            model.load_state_dict(saved)
            model.cpu().eval()
            record["failed"] = exc.message
            record["val_accuracy_after"] = round(top1_accuracy(model, *self.data.val_tensors()), 3)
            return record
        model.cpu().eval()  # pruning continues on the CPU, where the graph was traced
        # the trainer keeps its best epoch on val: that epoch's val top-1 is the model's now
        record["rollbacks"] = result.rollbacks
        record["val_accuracy_after"] = round(result.best_val_accuracy, 3)
        return record

    def notes(self) -> str:
        """The steps in a few words for the ledger: val top-1 after each step (after recovery)."""
        parts = []
        for row in self.rows:
            text = f"{row['val_accuracy']:.1f}%"
            after = row.get("recovery", {}).get("val_accuracy_after")
            parts.append(f"{text} (recovered {after:.1f}%)" if after is not None else text)
        return " → ".join(parts)
