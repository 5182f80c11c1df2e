"""The ``prune`` stage's recipe section.

A recipe gives exactly one target, each a key of its own so the YAML reads naturally::

    - prune: {ratio: 0.5}                                   # remove 50% of the channels
    - prune: {macs_reduction: 3}                            # teacher MACs / student MACs >= 3
    - prune: {params_reduction: 2}                          # teacher params / student params >= 2
    - prune: {latency: {ms: 4.0, threads: 1, batch_size: 1}}    # measured on ONNX Runtime
    - prune: {speedup: {factor: 2.5, threads: 1, batch_size: 32}}  # over the teacher, measured

``PruneConfig.target`` turns the chosen key into one of the typed targets below; the search in
``edgekd.prune.targets`` dispatches on that type.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edgekd.config_base import StrictModel

ImportanceName = Literal["l1", "l2", "bn_scale", "lamp", "taylor", "random"]
RuntimeName = Literal["onnxruntime"]


class RatioTarget(StrictModel):
    """Remove this fraction of the channels (of every layer with ``per_layer``, overall with ``global``)."""

    ratio: float = Field(..., ge=0.0, lt=1.0, description="fraction of channels removed, in [0, 1)")


class ReductionTarget(StrictModel):
    """Shrink a counted figure (MACs or parameters) by a factor relative to the teacher."""

    metric: Literal["macs", "params"]
    factor: float = Field(..., gt=1.0, description="teacher figure / student figure (2.0 keeps half)")


class MeasuredTarget(StrictModel):
    """Where a latency is measured: a named runtime, a thread count and a batch size."""

    runtime: RuntimeName = Field("onnxruntime", description="runtime the latency is measured on (CPU)")
    threads: int = Field(1, ge=1, le=256, description="intra-op threads")
    batch_size: int = Field(1, ge=1, le=4096, description="samples per timed call")


class LatencyTarget(MeasuredTarget):
    """The student's median latency per call must be at most ``ms``."""

    ms: float = Field(..., gt=0.0, description="median milliseconds per batch, at most")


class SpeedupTarget(MeasuredTarget):
    """Teacher latency / student latency, timed side by side, must be at least ``factor``."""

    factor: float = Field(..., gt=1.0, description="measured speed-up over the teacher, at least")


PruneTarget = RatioTarget | ReductionTarget | LatencyTarget | SpeedupTarget


class LatencyProbe(StrictModel):
    """The before/after latency the report shows (teacher and student timed side by side)."""

    threads: int = Field(1, ge=1, le=256, description="ONNX Runtime intra-op threads")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], min_length=1,
                                   description="batch sizes timed")
    min_time_s: float = Field(0.5, gt=0.0, le=60.0, description="timed seconds per model and batch size, at least")


class RecoveryConfig(StrictModel):
    """Short recovery training between iterative pruning steps (``steps`` > 1), on the shared trainer.

    After each step but the last the student trains ``epochs`` epochs from its pruned weights,
    distilling from the teacher (``objective: distill``, Hinton KD at ``temperature``/``alpha``) or on
    the labels alone (``finetune``), at a fine-tuning learning rate; the trainer's divergence guard
    rolls back a diverging epoch. The last step's recovery is the recipe's own distill/finetune stage.
    On the quickstart (ResNet-20 width 40, 60% in 3 steps) one epoch per step left the student at
    55% val right after the last step against 13% one-shot (docs/prune.md).
    """

    epochs: int = Field(1, ge=0, le=50, description="training epochs after each step but the last (0: none, "
                                                    "BatchNorm recalibration only)")
    objective: Literal["distill", "finetune"] = Field(
        "distill", description="distill from the teacher (KD) or fine-tune on the labels")
    lr: float = Field(0.01, gt=0.0, le=10.0, description="peak learning rate (fine-tuning sized)")
    warmup_epochs: float = Field(0.2, ge=0.0, description="linear warm-up, in epochs")
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="distill: softmax temperature")
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="distill: share of the soft (teacher) loss")
    grad_clip: float | None = Field(5.0, gt=0.0, description="clip the global gradient norm; null: off")
    batch_size: int | None = Field(None, ge=1, le=4096, description="mini-batch size; null: the data section's, at "
                                   "most 32 (recovery from trained weights, as distill and finetune)")


_TARGET_KEYS = ("ratio", "macs_reduction", "params_reduction", "latency", "speedup")


class PruneConfig(StrictModel):
    """Structured pruning with torch-pruning (dependency graph): which channels, how many, where."""

    # -- the target: exactly one of these ---------------------------------------------------
    ratio: float | None = Field(None, ge=0.0, lt=1.0,
                                description="target: fraction of channels removed, in [0, 1)")
    macs_reduction: float | None = Field(
        None, gt=1.0, description="target: teacher MACs / student MACs at least this factor (2 = half the MACs)")
    params_reduction: float | None = Field(
        None, gt=1.0, description="target: teacher params / student params at least this factor")
    latency: LatencyTarget | None = Field(None, description="target: measured student latency at most this")
    speedup: SpeedupTarget | None = Field(None, description="target: measured speed-up over the teacher")

    # -- how channels are chosen and counted ------------------------------------------------
    importance: ImportanceName = Field("l2", description="channel importance criterion ('random' is a control)")
    scope: Literal["per_layer", "global"] = Field(
        "per_layer", description="rank channels within each layer (uniform cut, fast models) or across the network")
    steps: int = Field(1, ge=1, le=100, description="iterative pruning steps (torch-pruning's linear schedule), "
                       "each followed by BatchNorm recalibration, and all but the last by recovery training")
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig,
                                     description="training between iterative steps (used when steps > 1)")
    auto_steps: int = Field(
        5, ge=0, le=100, description="with steps: 1 and a ratio target, when the one-shot cut leaves the student "
        "crippled (below auto_steps_below, at chance, or not finite), prune the unpruned student again in this "
        "many steps with recovery between them and keep the better of the two (0 or 1: off)")
    auto_steps_below: float = Field(
        0.5, ge=0.0, le=1.0, description="'crippled': the one-shot student keeps less than this share of the "
        "unpruned student's val accuracy above chance (0.5: a 98% teacher cut to below 54% on 10 classes; "
        "0: only a student at chance)")
    round_to: int | None = Field(
        8, ge=1, le=512, description="keep channel counts at multiples of this (vectorised kernels run "
        "full blocks; 5-7 leftover channels are slow); null to disable")
    max_layer_ratio: float = Field(0.9, gt=0.0, lt=1.0,
                                   description="no layer loses more than this fraction of its channels")
    ignored_layers: list[str] = Field(
        default_factory=list, description="module names never pruned (the classifier is always kept)")
    prune_heads: bool = Field(True, description="in self-attention, remove whole heads (not head dimensions)")
    taylor_batches: int = Field(4, ge=1, le=1000, description="training batches for Taylor importance gradients")
    batch_size: int = Field(64, ge=1, le=4096,
                            description="batch size of the training batches Taylor and BN recalibration read")
    bn_recalibration_batches: int = Field(
        8, ge=0, le=1000, description="training batches to re-estimate BatchNorm statistics after pruning (0: off)")
    search_step: float = Field(0.05, gt=0.0, le=0.5,
                               description="channel-ratio step while searching a MACs/params/latency/speed-up target")
    refine: int = Field(4, ge=0, le=20, description="bisection rounds after the search brackets the target; with "
                        "per_layer scope, >0 also tries moving single layers to the next ratio (finer steps)")
    probe: LatencyProbe | None = Field(default_factory=LatencyProbe,
                                       description="before/after ONNX Runtime latency for the report; null skips it")

    @model_validator(mode="after")
    def _one_target(self) -> PruneConfig:
        given = [k for k in _TARGET_KEYS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one pruning target (one of: {', '.join(_TARGET_KEYS)}); "
                             f"got {', '.join(given) if given else 'none'}")
        if self.scope == "per_layer" and self.ratio is not None and self.ratio > self.max_layer_ratio:
            raise ValueError(f"ratio {self.ratio} cuts every layer by more than max_layer_ratio "
                             f"{self.max_layer_ratio}; raise max_layer_ratio or lower the ratio")
        return self

    @property
    def target(self) -> PruneTarget:
        """The chosen target as a typed object (``edgekd.prune.targets`` dispatches on its type)."""
        if self.ratio is not None:
            return RatioTarget(ratio=self.ratio)
        if self.macs_reduction is not None:
            return ReductionTarget(metric="macs", factor=self.macs_reduction)
        if self.params_reduction is not None:
            return ReductionTarget(metric="params", factor=self.params_reduction)
        return self.latency or self.speedup  # type: ignore[return-value]  # _one_target guarantees one
