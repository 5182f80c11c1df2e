"""The ``distill`` and ``finetune`` recipe sections.

Both are ``TrainConfig`` (epochs, lr, schedule, ... for the same trainer) plus, for
``distill``, the temperature, the soft/hard blend and a list of loss terms:

    - distill:
        epochs: 15
        temperature: 4
        alpha: 0.9
        losses:
          - {kind: kd}
          - {kind: hint, student_layer: layer2, teacher_layer: layer2, weight: 1.0}
          - {kind: attention, student_layer: layer3, teacher_layer: layer3}
          - {kind: rkd}                      # on the logits unless layers are named

Layers are module paths as printed by ``model.named_modules()`` (``layer2.0.conv1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Union, get_args

from pydantic import Field, model_validator

from edgekd.config_base import StrictModel
from edgekd.distill.losses import AttentionLoss, HintLoss, KDLoss, RKDLoss, TermLoss
from edgekd.registry import Registry
from edgekd.train.config import TrainConfig


class KDTerm(StrictModel):
    """Hinton et al. 2015: alpha·T²·KL(teacher_T ‖ student_T) + (1 − alpha)·CE(student, labels)."""

    kind: Literal["kd"]
    weight: float = Field(1.0, ge=0.0, description="multiplies the whole term")


class _LayerPair(StrictModel):
    student_layer: str = Field(..., min_length=1, description="module path in the student, e.g. layer2")
    teacher_layer: str = Field(..., min_length=1, description="module path in the teacher")


class HintTerm(_LayerPair):
    """FitNets (Romero et al. 2015): MSE between the features of two named layers. A 1x1 conv (or
    linear) adaptor maps the student's channels to the teacher's when they differ; it is trained
    with the student and never exported."""

    kind: Literal["hint"]
    weight: float = Field(1.0, ge=0.0, description="multiplies the MSE")


class AttentionTerm(_LayerPair):
    """Attention transfer (Zagoruyko & Komodakis 2017): match the L2-normalised spatial maps
    mean_c(|f|^p) of two named conv layers; channel counts may differ."""

    kind: Literal["attention"]
    weight: float = Field(500.0, ge=0.0, description="the paper's beta/2 with beta = 1e3 (its reference code)")
    p: int = Field(2, ge=1, le=4, description="exponent of the activation magnitude")


class RKDTerm(StrictModel):
    """Relational KD (Park et al. 2019): match the pairwise distances and triplet angles of a
    batch's embeddings. Embeddings are the logits unless both layers are named."""

    kind: Literal["rkd"]
    weight: float = Field(1.0, ge=0.0, description="multiplies distance_weight·D + angle_weight·A")
    distance_weight: float = Field(25.0, ge=0.0, description="paper: 25")
    angle_weight: float = Field(50.0, ge=0.0, description="paper: 50")
    student_layer: str | None = Field(None, min_length=1, description="module path; None = the logits")
    teacher_layer: str | None = Field(None, min_length=1, description="module path; None = the logits")

    @model_validator(mode="after")
    def _both_or_neither(self) -> RKDTerm:
        if (self.student_layer is None) != (self.teacher_layer is None):
            raise ValueError("name both student_layer and teacher_layer, or neither (then the logits are used)")
        return self


@dataclass(frozen=True)
class LossEntry:
    """What edgekd knows about one distillation loss kind.

    ``config`` is the recipe term (a ``StrictModel`` whose ``kind`` is ``Literal[name]``), ``loss`` the
    ``TermLoss`` subclass the objective runs for it. Adding a loss is its config class, its ``TermLoss``
    (in its own module or ``edgekd.distill.losses``) and one entry in ``LOSSES``: the recipe's
    ``LossTerm`` union, its JSON Schema and validation errors, and the objective's dispatch follow.
    """

    name: str
    config: type[StrictModel]
    loss: type[TermLoss]
    #: a few words for docs and errors
    summary: str
    #: the term includes the hard-label cross-entropy (without such a term the objective adds it)
    hard_labels: bool = False
    #: a recipe may give at most one term of this kind (its weight sets its strength)
    at_most_one: bool = False

    def __post_init__(self) -> None:
        # the discriminator value must be the entry's name, or validation and dispatch disagree
        kind = self.config.model_fields.get("kind")
        if kind is None or get_args(kind.annotation) != (self.name,):
            raise ValueError(f"loss {self.name!r}: {self.config.__name__}.kind must be Literal[{self.name!r}]")


LOSSES: Registry[LossEntry] = Registry("loss kind", [
    LossEntry("kd", KDTerm, KDLoss, "Hinton KD on the logits plus hard-label CE", hard_labels=True,
              at_most_one=True),
    LossEntry("hint", HintTerm, HintLoss, "FitNets MSE between two named layers (through an adaptor)"),
    LossEntry("attention", AttentionTerm, AttentionLoss, "attention transfer between two conv layers"),
    LossEntry("rkd", RKDTerm, RKDLoss, "relational KD: pairwise distances and angles"),
])

#: one recipe loss term: the union of the registered term configs, picked by ``kind``
LossTerm = Annotated[Union[tuple(entry.config for entry in LOSSES.values())],  # noqa: UP007 (built from a tuple)
                     Field(discriminator="kind")]


class TransferSource(StrictModel):
    """Train on the training split with most labels withheld: ``labeled_fraction`` of it (stratified, chosen by
    the seed) keeps its labels. ``distill`` uses every training input (the teacher's soft targets need no
    label; the hard-label term only the labeled share); ``finetune`` can use only the labeled share."""

    kind: Literal["transfer"]
    labeled_fraction: float = Field(..., gt=0.0, le=1.0, description="share of the training split that keeps "
                                                                     "its labels, e.g. 0.1")


#: recovery from trained weights (a pruned or copied student): a fine-tuning lr, a short warm-up and (distill)
#: half the loss on the hard labels. Measured on the quickstart (ResNet-20 w40 pruned 60%, distilled 4 epochs)
#: and issue 14's Hugging Face MobileNetV2 / ResNet-18 pruned 50% (tools/check_recovery.py): see docs/distill.md.
#: ``keep: last``: from trained weights the cosine schedule's last epoch (lr near 0) is the one to ship; the best
#: val top-1 of 8 readings on the quickstart's 269 val samples (one sample = 0.37 points) picked an epoch mid-schedule
#: that lost 0.84 / 1.11 points on test where the last lost 0.56 / 0.56 (seeds 1 / 4; docs/distill.md).
FROM_WEIGHTS = {"lr": 0.01, "warmup_epochs": 0.2, "alpha": 0.5, "keep": "last"}
#: a student that starts recovery keeping less than this share of its teacher's val top-1 above chance (pruning
#: took most of what it knew) is retrained at ``DAMAGED_LR`` rather than fine-tuned at 0.01: learning-rate
#: rewinding (Renda, Frankle & Carbin 2020, "Comparing Rewinding and Fine-tuning in Neural Network Pruning")
#: retrains a pruned network at its original training lr and beats fine-tuning at a small one. Measured on the
#: zoo's damaged students (digits 16x16, 4 distill epochs, test drop at lr 0.01 -> 0.03): a dict-output CNN kept
#: 53% (2.51 -> 0.28 points), a channel-shuffle net 83% (2.23 -> 1.39), a GroupNorm net 74% (3.34 -> 2.51).
#: The divergence guard still rolls back an epoch that falls below the start and lowers the lr.
DAMAGED_SHARE = 0.9
DAMAGED_LR = 0.03
#: from trained weights the batch is at most this (the data section's batch_size when smaller): recovery needs
#: optimizer steps more than throughput. 4 epochs of batch 64 on 1,169 samples are 76 steps; the zoo's ViT and
#: Swin students, still rising at epoch 4, lost 3.62 / 7.24 points at batch 64 and 1.39 / 2.23 at batch 16, and
#: the quickstart ... (docs/distill.md)
RECOVERY_MAX_BATCH = 32
#: a student of another architecture starts from random weights: the trainer's own defaults, Hinton's alpha
FROM_SCRATCH = {"lr": 0.05, "warmup_epochs": 1.0, "alpha": 0.9, "keep": "best_val_accuracy"}


class _Recovery(TrainConfig):
    """Training that may start from trained weights: lr and warm-up default by where it starts."""

    lr: float | None = Field(None, gt=0.0, le=10.0, description="peak learning rate; null: 0.01 when the student "
                             "starts from trained (pruned or copied) weights, 0.03 when those keep less than 90% of "
                             "the teacher's val top-1 above chance (retrained, not fine-tuned), 0.05 from random "
                             "weights")
    warmup_epochs: float | None = Field(None, ge=0.0, description="linear warm-up in epochs; null: 0.2 from "
                                        "trained weights, 1 from random weights")
    batch_size: int | None = Field(None, ge=1, description="mini-batch size; null: the data section's batch_size, "
                                   f"at most {RECOVERY_MAX_BATCH} when the student starts from trained weights "
                                   "(recovery needs optimizer steps more than throughput)")

    source: TransferSource | None = Field(None, description="null: the training split with all its labels; "
                                          "{kind: transfer, labeled_fraction: F}: only a share keeps its labels")

    def concrete(self, from_weights: bool, data_batch: int | None = None,
                 start_share: float | None = None) -> TrainConfig:
        """Fill the defaults that depend on where the student starts (``FROM_WEIGHTS``/``FROM_SCRATCH``);
        ``data_batch``: the data section's batch_size, capped at ``RECOVERY_MAX_BATCH`` from trained weights;
        ``start_share``: the share of the teacher's val top-1 above chance the student keeps at the start
        (``kept_share``; None: unknown), below ``DAMAGED_SHARE`` the lr defaults to ``DAMAGED_LR``."""
        defaults = dict(FROM_WEIGHTS if from_weights else FROM_SCRATCH)
        if from_weights and start_share is not None and start_share < DAMAGED_SHARE:
            defaults["lr"] = DAMAGED_LR
        if self.early_stopping_patience is not None:
            defaults["keep"] = "best_val_accuracy"  # early stopping is a search for the best epoch
        if from_weights:
            defaults["batch_size"] = min(data_batch or RECOVERY_MAX_BATCH, RECOVERY_MAX_BATCH)
        return self.model_copy(update={k: v for k, v in defaults.items()
                                       if k in type(self).model_fields and getattr(self, k) is None})


class DistillConfig(_Recovery):
    """Train the student against the teacher (the recovery step after pruning/quantization)."""

    grad_clip: float | None = Field(5.0, gt=0.0, description="clip the global gradient norm to this (on for "
                                    "distillation: soft targets of a confident teacher give rare huge gradients); "
                                    "null = off")
    logit_standardization: bool = Field(False, description="z-score student and teacher logits per sample before "
                                        "the temperature (Sun et al. 2024): soft targets then ignore the teacher's "
                                        "logit scale")

    soft_until_teacher: bool = Field(False, description="turn the kd term's soft share (alpha) to 0 from the epoch "
                                     "after the student's val top-1 first reaches the teacher's: a student that can "
                                     "outgrow its teacher then learns from the labels alone (ignored with a transfer "
                                     "source, whose unlabeled inputs have only the soft targets)")
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="softmax temperature T of the kd term")
    alpha: float | None = Field(None, ge=0.0, le=1.0, description="kd term: share of the soft (teacher) loss; "
                                "1 - alpha goes to the hard-label cross-entropy; null: 0.5 when the student starts "
                                "from trained (pruned or copied) weights, which relearn the task from labels as fast "
                                "as from soft targets, 0.9 from random weights")
    losses: list[LossTerm] = Field(default_factory=lambda: [KDTerm(kind="kd")], min_length=1,
                                   description="loss terms, summed with their weights; without a kd term the "
                                               "hard-label cross-entropy is still included")
    teacher_cache: bool = Field(True, description="compute the teacher's outputs once and reuse them every epoch "
                                                  "(turned off by augment: each step's view is new)")
    cache_max_mb: float = Field(1024.0, gt=0.0, description="skip the cache when it would need more memory")

    def concrete(self, from_weights: bool, data_batch: int | None = None,
                 start_share: float | None = None) -> TrainConfig:
        config = super().concrete(from_weights, data_batch, start_share)
        if self.alpha is None and self.source is not None:
            # most inputs have no label: soft targets are all they teach, whatever the student starts from
            config = config.model_copy(update={"alpha": FROM_SCRATCH["alpha"]})
        return config

    @model_validator(mode="after")
    def _one_kd_term(self) -> DistillConfig:
        for entry in LOSSES.values():
            if entry.at_most_one and sum(t.kind == entry.name for t in self.losses) > 1:
                raise ValueError(f"give at most one {entry.name} term (its weight sets its strength)")
        return self


class FinetuneConfig(_Recovery):
    """Hard labels only, on the same trainer: the baseline distillation has to beat."""
