"""The recipe's ``gate:`` section. A light module (pydantic only), so loading a recipe imports nothing
heavy; ``edgekd.report.gate`` evaluates it."""

from __future__ import annotations

from pydantic import Field

from edgekd.config_base import StrictModel


class GateConfig(StrictModel):
    """Fail the run (exit code 3, after writing the report) when the student loses too much accuracy."""

    max_accuracy_drop: float | None = Field(
        None, ge=0.0, le=100.0,
        description="largest allowed loss of top-1 accuracy, in percentage points, of any benchmarked student "
                    "artifact against the teacher on the same runtime (None: no gate)")
