"""The ``stages:`` list of a recipe: each item names exactly one stage and holds its config.

Each stage package owns its config class; this module only gathers them. A field's name is
the key users write in the recipe (``- prune: {...}``).
"""

from __future__ import annotations

from pydantic import model_validator

from edgekd.cluster.config import ClusterConfig
from edgekd.config_base import StrictModel
from edgekd.distill.config import DistillConfig, FinetuneConfig
from edgekd.export.config import ExportConfig
from edgekd.lowrank.config import LowRankConfig
from edgekd.prune.config import PruneConfig
from edgekd.quantize.config import QuantizeConfig


class StageEntry(StrictModel):
    """One item of ``stages:``. Exactly one field is set."""

    # one line per stage: `<recipe key>: <ConfigClass> | None = None`
    prune: PruneConfig | None = None
    distill: DistillConfig | None = None
    finetune: FinetuneConfig | None = None
    export: ExportConfig | None = None
    quantize: QuantizeConfig | None = None
    lowrank: LowRankConfig | None = None
    cluster: ClusterConfig | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StageEntry:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        valid = ", ".join(type(self).model_fields)
        if len(given) != 1:
            raise ValueError(f"each stage item names exactly one stage (one of: {valid}); got {len(given)}")
        return self

    @property
    def config(self) -> StrictModel:
        return next(getattr(self, n) for n in type(self).model_fields if getattr(self, n) is not None)

    @property
    def key(self) -> str:
        return next(n for n in type(self).model_fields if getattr(self, n) is not None)
