"""The base class of every recipe model: unknown keys are errors, values are validated on set."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Recipe section. ``extra="forbid"`` makes a typo an error instead of a silent default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
