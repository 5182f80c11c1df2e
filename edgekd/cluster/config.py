"""The ``cluster`` stage's recipe section::

    - cluster: {k: 16}                           # 16 shared values per layer (a 4-bit index)
    - cluster: {k: 256, epochs: 5, ignored_layers: [head]}

Put it after the stages that change weights freely (distill, finetune, prune): its own short
distillation keeps every weight on its cluster's value; a later training stage would not.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgekd.config_base import StrictModel


class ClusterConfig(StrictModel):
    """Per-layer k-means weight sharing, then distillation with the assignments fixed."""

    k: int = Field(16, ge=2, le=65536, description="shared values per layer (16: a 4-bit index, 256: 8-bit)")
    layers: list[Literal["linear", "conv"]] = Field(default_factory=lambda: ["linear", "conv"], min_length=1,
                                                    description="kinds of layers whose weights are clustered")
    ignored_layers: list[str] = Field(default_factory=list, description="module names left unclustered")
    min_weights: int = Field(64, ge=1, description="layers with fewer weights than this are left as they are "
                             "(their codebook would cost more than it saves)")
    iterations: int = Field(30, ge=1, le=1000, description="Lloyd iterations of the 1-D k-means")
    epochs: int = Field(3, ge=0, le=1000, description="distillation epochs with the assignments fixed (0: none)")
    lr: float = Field(1e-3, gt=0.0, le=10.0, description="AdamW peak learning rate of that distillation")
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="KD softmax temperature")
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="share of the soft (teacher) loss")
    batch_size: int | None = Field(None, ge=1, le=4096, description="mini-batch size; null: the data section's")
