"""How a model is trained: optimizer, schedule, regularisation, stopping. Shared by every trainer user.

The defaults suit the small CNNs/MLPs this tool compresses for edge devices (tens of thousands to
a few million parameters, datasets of thousands of samples): SGD with Nesterov momentum and a
cosine schedule with one warm-up epoch trains ResNet-20/56 on digits to >97% in ~15 epochs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edgekd.config_base import StrictModel
from edgekd.train.augment import AugmentConfig

#: which epoch a training run keeps (``TrainConfig.keep``)
KeepEpoch = Literal["best_val_accuracy", "best_val_loss", "last"]


class GuardConfig(StrictModel):
    """The divergence guard: after a bad step or epoch, roll back to the last good epoch, lower the lr, go on.

    A step whose loss is not finite or exceeds ``explode_factor`` x max(the run's first loss, ln C),
    an epoch whose train accuracy is at chance, an epoch whose mean train loss is above ``rise_factor``
    x max(the run's first loss, ln C), or an epoch whose val accuracy falls more than
    ``max_drop_from_start`` points below the starting model's (when that was above chance; or more than
    two standard errors of the start's val reading, when that is larger) is undone:
    weights, schedule, RNG and loss scaler return to the end of the last good epoch, the optimizer's
    moments are cleared and every lr is multiplied by ``lr_factor``. Each rollback is recorded.
    When train accuracy is high but val accuracy at chance, BatchNorm statistics are re-estimated
    from training batches; if that does not help, training stops with an error saying so.
    """

    enabled: bool = Field(True, description="watch for divergence and roll back; false: a NaN loss stops the run")
    max_rollbacks: int = Field(3, ge=0, le=20, description="rollbacks per run before it stops with an error")
    lr_factor: float = Field(0.3, gt=0.0, lt=1.0, description="every lr is multiplied by this at each rollback")
    explode_factor: float = Field(10.0, gt=1.0, description="a step loss above this x max(first loss, ln C) "
                                                            "counts as exploding")
    rise_factor: float | None = Field(
        1.05, gt=1.0, description="an epoch whose mean train loss is above this x max(the run's first loss, "
                                  "ln C) counts as diverged (it made the model worse than it started); only from "
                                  "random weights (from trained weights the val drop from the start judges); "
                                  "null: off")
    chance_after_steps: int = Field(50, ge=0, description="train accuracy at chance counts only after this many "
                                    "optimizer steps (a first epoch of 2 steps proves nothing)")
    chance_margin: float = Field(0.05, ge=0.0, lt=1.0, description="'at chance' means at most chance + this share "
                                                                 "of the way from chance to 100%")
    max_drop_from_start: float | None = Field(
        2.0, ge=0.0, description="roll back an epoch whose val top-1 is more than this many points below the "
                                 "starting model's, or two standard errors of the start's val reading if that is "
                                 "more (applies when the start is above chance); null: off")
    bn_recalibration_batches: int = Field(16, ge=1, le=1000, description="training batches that re-estimate "
                                                                        "BatchNorm statistics")


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
    keep: KeepEpoch | None = Field(
        None, description="which epoch's weights the run ends with, judged on the val split: best_val_accuracy, "
                          "best_val_loss (smoother on a small val split: cross-entropy moves with every sample's "
                          "confidence, top-1 only when one flips) or last; null: best_val_accuracy, except "
                          "distill/finetune from trained weights: last (the cosine schedule's end; see "
                          "docs/distill.md) unless early_stopping_patience is set")
    mixed_precision: bool = Field(True, description="autocast (bf16, else fp16 + loss scaling) on CUDA; ignored on CPU")
    channels_last: bool = Field(False, description="train convolutions in the channels-last (NHWC) memory format, "
                                "which oneDNN's CPU kernels run faster (a ResNet-20 w40 step at 24x24, batch 64: "
                                "1.24x on an AMD EPYC); the model is handed on in the usual format. Off by default: "
                                "a model that calls .view() on its activations may refuse NHWC tensors")
    guard: GuardConfig = Field(default_factory=GuardConfig, description="divergence guard (rollback + lower lr)")
    precise_bn: bool | None = Field(
        None, description="re-estimate BatchNorm running statistics from training batches before each validation "
                          "(Wu & Johnson 2021, 'precise BN'); null: only when some BatchNorm's momentum is >= "
                          "0.5 (TensorFlow's decay read as PyTorch's momentum, as in Hugging Face MobileNetV1/V2: "
                          "its running statistics are the last batch's) or <= 0.02 or None (torchvision's "
                          "MobileNetV3/EfficientNet use 0.01: the statistics trail the weights of a short run)")

    def concrete(self, from_weights: bool, data_batch: int | None = None) -> TrainConfig:
        """This config with every default that depends on the start filled in: ``from_weights`` is True
        when training starts from trained (pruned or copied) weights. Plain training keeps the epoch with
        the best val accuracy. ``data_batch``: the data section's batch_size (recovery configs cap it)."""
        return self if self.keep is not None else self.model_copy(update={"keep": "best_val_accuracy"})

    @model_validator(mode="after")
    def _patience_needs_a_best(self) -> TrainConfig:
        if self.keep == "last" and self.early_stopping_patience is not None:
            raise ValueError("keep: last ends with the last epoch, so early_stopping_patience (which stops after "
                             "epochs without a better one) has nothing to compare; drop one of them")
        return self

    @property
    def active_augment(self) -> AugmentConfig | None:
        """The augmentation to apply, or None when there is none (no block, or one that does nothing)."""
        return self.augment if self.augment is not None and self.augment.active else None
