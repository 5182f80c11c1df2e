"""The report: one typed, versioned document built from a run directory.

``report.json`` is this model dumped; ``report.md`` and ``report.html`` render it. A consumer
checks ``schema_version`` first: a field is only removed or changes meaning with a new version.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from edgekd.bench.results import BenchmarkResult

REPORT_SCHEMA_VERSION = "edgekd.report/1"


class StageStatus(BaseModel):
    index: int
    key: str
    status: str
    duration_s: float | None = None
    error: str | None = None


class LedgerEntry(BaseModel):
    """The student after one stage (the teacher row first)."""

    stage: str
    params: int | None = None
    macs: int | None = None
    val_accuracy: float | None = Field(None, description="top-1 percent on the val split (what decisions saw)")
    test_accuracy: float | None = Field(None, description="top-1 percent on the test split (no decision saw it)")
    parity: str | None = Field(None, description="agreement of the stage's files with PyTorch, when it made any")
    notes: dict[str, Any] = Field(default_factory=dict)


class Comparison(BaseModel):
    """A student model against the teacher at one runtime, thread count and batch size."""

    runtime: str
    threads: int
    batch_size: int
    model: str = Field(..., description="student label: student, student-int8")
    teacher_p50_ms: float | None = None
    p50_ms: float
    speedup: float | None = Field(None, description="teacher / student latency, median of interleaved rounds")
    teacher_top1_pct: float | None = None
    top1_pct: float | None = None

    @property
    def setting(self) -> str:
        return f"measured latency on {self.runtime}, {self.threads} thread{'s' * (self.threads != 1)}, " \
               f"batch {self.batch_size}"


class AccuracyDrop(BaseModel):
    """Teacher top-1 minus a student model's top-1, on the same runtime and samples (percentage points)."""

    runtime: str
    model: str
    teacher_top1_pct: float
    top1_pct: float
    drop: float
    samples: int | None = None
    basis: str = Field(..., description="where the numbers come from")
    split: str = Field("val", description="data split both accuracies are measured on: test (no decision of the "
                                          "run saw it) or val (older runs); the gate reads only test")


class GateResult(BaseModel):
    max_accuracy_drop: float
    worst: AccuracyDrop | None
    passed: bool
    message: str


class Report(BaseModel):
    schema_version: Literal["edgekd.report/1"] = REPORT_SCHEMA_VERSION
    generated: str
    run_dir: str
    name: str
    created: str | None = None
    recipe_hash: str | None = None
    seed: int | None = None
    machine: dict[str, Any] = Field(default_factory=dict)
    machine_summary: str = ""
    versions: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] | None = None
    teacher: dict[str, Any] = Field(default_factory=dict)
    stages: list[StageStatus] = Field(default_factory=list)
    artifacts: list[dict[str, Any]] = Field(default_factory=list)
    ledger: list[LedgerEntry] = Field(default_factory=list)
    benchmark: BenchmarkResult | None = None
    comparisons: list[Comparison] = Field(default_factory=list)
    accuracy_drops: list[AccuracyDrop] = Field(default_factory=list)
    gate: GateResult | None = None
    #: which data split each accuracy figure of this report is measured on
    accuracy_splits: dict[str, str] = Field(default_factory=dict)
    #: the other stages' report data (prune channel tables, quantize candidates, export parity, ...)
    stage_data: dict[str, Any] = Field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def worst_drop(self, split: str | None = None) -> AccuracyDrop | None:
        """The largest drop, among those measured on ``split`` when given."""
        drops = [d for d in self.accuracy_drops if split is None or d.split == split]
        return max(drops, key=lambda d: d.drop, default=None)

    def deployed_student(self) -> tuple[str, str | None]:
        """(benchmark label, artifact path) of the student a user ships: the INT8 file when the
        quantize stage shipped one, otherwise the FP32 student."""
        int8 = next((a for a in self.artifacts if a.get("role") == "student" and a.get("precision") == "int8"
                     and a.get("status") == "ok"), None)
        if int8 is not None:
            return "student-int8", int8.get("path")
        fp32 = next((a for a in self.artifacts if a.get("role") == "student" and a.get("status") == "ok"), None)
        return "student", None if fp32 is None else fp32.get("path")

    def failed_stages(self) -> list[StageStatus]:
        return [s for s in self.stages if s.status == "failed"]
