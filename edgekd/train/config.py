"""How a model is trained: optimizer, schedule, regularisation, stopping. Shared by every trainer user.

The defaults suit the small CNNs/MLPs this tool compresses for edge devices (tens of thousands to
a few million parameters, datasets of thousands of samples): SGD with Nesterov momentum and a
cosine schedule with one warm-up epoch trains ResNet-20/56 on digits to >97% in ~15 epochs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgekd.recipe.base import StrictModel
from edgekd.train.augment import AugmentConfig


class TrainConfig(StrictModel):
    """A training run: used by the teacher's ``train:`` block, ``finetune`` and ``distill``."""

    epochs: int = Field(15, ge=1, description="passes over the training split")
    batch_size: int | None = Field(None, ge=1, description="mini-batch size; None uses the data section's batch_size")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd (Nesterov momentum) or adamw")
    lr: float = Field(0.05, gt=0.0, le=10.0, description="peak learning rate (reached after warm-up)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (adamw: beta1)")
    weight_decay: float = Field(5e-4, ge=0.0, lt=1.0, description="L2 / decoupled weight decay")
    schedule: Literal["cosine", "step", "onecycle", "constant"] = Field(
        "cosine", description="learning-rate schedule after warm-up (updated every step)")
    warmup_epochs: float = Field(1.0, ge=0.0, description="linear warm-up to lr, in epochs (fractional allowed; capped at half the run)")
    step_size: int = Field(5, ge=1, description="schedule=step: epochs between decays")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="schedule=step: factor applied every step_size epochs")
    grad_clip: float | None = Field(None, gt=0.0, description="clip the global gradient norm to this; None = off")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="for the hard-label cross-entropy")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many epochs without a better val accuracy; None = off")
    augment: AugmentConfig | None = Field(
        None, description="random shifts/flips of each training batch; None = the samples as they are")
    mixed_precision: bool = Field(True, description="autocast (bf16, else fp16 + loss scaling) on CUDA; ignored on CPU")

    @property
    def active_augment(self) -> AugmentConfig | None:
        """The augmentation to apply, or None when there is none (no block, or one that does nothing)."""
        return self.augment if self.augment is not None and self.augment.active else None
