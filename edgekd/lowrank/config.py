"""The ``lowrank`` stage's recipe section.

Exactly one target, each a key of its own (as in ``prune``)::

    - lowrank: {energy: 0.9}              # every layer keeps 90% of its singular-value energy
    - lowrank: {params_reduction: 2}      # teacher params / student params >= 2 (one energy for all layers)
    - lowrank: {macs_reduction: 2}        # teacher MACs / student MACs >= 2
    - lowrank: {speedup: {factor: 1.5, threads: 1, batch_size: 32}}   # measured on ONNX Runtime

``ranks`` fixes the rank of named layers whatever the target says; ``round_to`` rounds every rank
up to a multiple (vectorised kernels run full blocks). A layer whose factorization would not cut its
MACs is left as it is, with the reason in the report.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from edgekd.config_base import StrictModel
from edgekd.prune.config import LatencyProbe, SpeedupTarget

_TARGET_KEYS = ("energy", "params_reduction", "macs_reduction", "speedup")


class LowRankConfig(StrictModel):
    """Truncated-SVD factorization of Linear and Conv layers into two thinner layers of rank r."""

    energy: float | None = Field(None, gt=0.0, le=1.0, description="target: share of each layer's singular-value "
                                 "energy (sum of squared singular values) kept, in (0, 1]")
    params_reduction: float | None = Field(
        None, gt=1.0, description="target: teacher params / student params at least this factor (searched: one "
                                  "energy threshold for every layer, the largest that meets it)")
    macs_reduction: float | None = Field(
        None, gt=1.0, description="target: teacher MACs / student MACs at least this factor (searched as above)")
    speedup: SpeedupTarget | None = Field(
        None, description="target: measured speed-up over the teacher (the student exported to ONNX and timed beside "
                          "it at threads/batch_size), searched as above; a plan that is not that much faster is not kept")
    ranks: dict[str, int] = Field(default_factory=dict, description="fixed rank per layer name (overrides the "
                                  "target for that layer); at most the layer's full rank")
    conv_scheme: Literal["auto", "spatial", "channel"] = Field(
        "auto", description="Conv2d: spatial SVD (kxk -> kx1 then 1xk), channel SVD (kxk to r channels then 1x1), "
                            "or auto: per layer, the one with fewer MACs at the same energy (Conv1d: channel)")
    round_to: int | None = Field(8, ge=1, le=512, description="round ranks up to a multiple of this; null: off")
    layers: list[Literal["linear", "conv"]] = Field(default_factory=lambda: ["linear", "conv"], min_length=1,
                                                    description="kinds of layers factorized")
    ignored_layers: list[str] = Field(default_factory=list, description="module names never factorized")
    min_macs_saving: float = Field(0.0, ge=0.0, lt=1.0, description="skip a layer whose factorization saves less "
                                   "than this share of its MACs (0: any saving)")
    probe: LatencyProbe | None = Field(default_factory=LatencyProbe,
                                       description="before/after ONNX Runtime latency for the report; null skips it")

    @model_validator(mode="after")
    def _one_target(self) -> LowRankConfig:
        given = [k for k in _TARGET_KEYS if getattr(self, k) is not None]
        if len(given) > 1 or (not given and not self.ranks):
            raise ValueError(f"give exactly one low-rank target (one of: {', '.join(_TARGET_KEYS)}), or only "
                             f"per-layer 'ranks'; got {', '.join(given) if given else 'none'}")
        return self

    @field_validator("ranks")
    @classmethod
    def _positive_ranks(cls, ranks: dict[str, int]) -> dict[str, int]:
        for name, rank in ranks.items():
            if rank < 1:
                raise ValueError(f"rank of layer {name!r} is {rank}; a rank is at least 1")
        return ranks

    @property
    def target_text(self) -> str:
        if self.speedup is not None:
            t = self.speedup
            return f"speedup {t.factor:g}x ({t.runtime}, {t.threads} thread(s), batch {t.batch_size})"
        for key in _TARGET_KEYS:
            if getattr(self, key) is not None:
                return f"{key} {getattr(self, key):g}"
        return "ranks only"
