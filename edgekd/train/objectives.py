"""What the trainer minimises. An objective turns (model, batch) into a loss.

The trainer knows nothing about distillation: a KD objective holds the teacher, registers its
forward hooks in ``setup`` and may own trainable helpers (hint adaptors) that the trainer
optimises and checkpoints with the model but that never become part of the exported model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgekd.data.bundle import DataBundle


@dataclass
class Batch:
    """One training mini-batch. ``index`` holds the samples' positions in ``DataBundle.train``,
    so objectives can look up per-sample caches (teacher outputs)."""

    x: Tensor
    y: Tensor
    index: Tensor


@dataclass
class LossOutput:
    """``total`` is what gets back-propagated; ``parts`` are detached terms for the metrics."""

    total: Tensor
    logits: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)


class Objective(ABC):
    """A training loss. Subclasses implement ``compute``; the hooks below are optional."""

    def setup(self, model: nn.Module, data: DataBundle, device: torch.device) -> None:  # noqa: B027
        """Called once before training with the (unwrapped) model already on ``device``."""

    def inputs_vary(self) -> None:  # noqa: B027
        """Called before ``setup`` when the trainer augments batches at random: a sample's input
        differs from epoch to epoch, so nothing may be cached per sample index."""

    def extra_modules(self) -> nn.Module | None:
        """Trainable helpers optimised alongside the model (e.g. hint adaptors); None if none."""
        return None

    def before_epoch(self, epoch: int, history: list[dict]) -> None:  # noqa: B027
        """Called before each epoch (1-based) with the rows of the epochs kept so far (each with its
        ``val_accuracy``, percent). Derive any per-epoch setting from ``history`` alone: a resumed run
        and a rolled-back epoch see the same history and so take the same path."""

    @abstractmethod
    def compute(self, model: nn.Module, batch: Batch) -> LossOutput:
        """Forward ``batch.x`` through ``model`` (possibly DDP-wrapped) and return the loss."""

    def teardown(self) -> None:  # noqa: B027
        """Remove hooks and release caches; called when training ends, also on errors."""

    def describe(self) -> dict:
        return {"objective": type(self).__name__}


class CrossEntropyObjective(Objective):
    """Hard labels only: the teacher's own training and the ``finetune`` baseline."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def compute(self, model: nn.Module, batch: Batch) -> LossOutput:
        logits = model(batch.x)
        loss = F.cross_entropy(logits.float(), batch.y, label_smoothing=self.label_smoothing)
        return LossOutput(total=loss, logits=logits, parts={"ce": loss.detach()})

    def describe(self) -> dict:
        return {"objective": "cross_entropy", "label_smoothing": self.label_smoothing}
