"""The report: one typed, versioned document built from a run directory.

``report.json`` is this model dumped; ``report.md`` and ``report.html`` render it. A consumer
checks ``schema_version`` first: a field is only removed or changes meaning with a new version.

``stage_data`` holds what each stage filed for the report, keyed by the stage's position in the
recipe, the same keys as ``stages[].key``: ``"<i>-<name>"`` with ``i`` the 0-based index in the
recipe's ``stages`` list (``"0-prune"``, ``"1-distill"``, ``"2-prune"``, ``"3-distill"``), so a
recipe with a stage kind twice has one entry per stage. Data a stage filed under another name than
its own sits at ``"<i>-<name>/<other>"`` (a distill stage's ``"1-distill/transfer"``). Reports of
runs made before this layout key ``stage_data`` by stage name (``"prune"``, one entry per kind);
``Report.stage_entries(name)`` (or ``stage_entries`` on report.json's dict) reads both layouts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field

from edgekd.bench.results import BenchmarkResult

REPORT_SCHEMA_VERSION = "edgekd.report/1"


def name_of_key(key: str) -> str:
    """The stage name of a position key written without one (manifests before ``name``): "1-distill" ->
    "distill", "teacher" -> "teacher"."""
    index, sep, name = key.partition("-")
    return name if sep and index.isdigit() else key


def stage_data_of(document: Mapping[str, Any], name: str) -> list[Any]:
    """The report data of every stage named ``name`` in a ``manifest.json`` or ``report.json`` document
    (a parsed dict), in run order: ``stage_data_of(manifest, "prune")[-1]`` is the last prune's. Works on
    runs from before position keys too."""
    data = document.get("report_data") if "report_data" in document else document.get("stage_data")
    stages = [(s["key"], s.get("name") or name_of_key(s["key"])) for s in document.get("stages") or []]
    return [entry for _, entry in stage_entries(data or {}, stages, name)]


class StageStatus(BaseModel):
    index: int
    key: str = Field(..., description='position key: "teacher", "<i>-<name>" (i-th recipe stage), "benchmark"')
    name: str | None = Field(None, description="the stage's name (prune, distill, ...); None in older runs")
    status: str
    duration_s: float | None = None
    error: str | None = None

    @property
    def kind(self) -> str:
        return self.name or name_of_key(self.key)


def stage_entries(stage_data: Mapping[str, Any], stages: Iterable[tuple[str, str]], name: str) -> list[tuple[str, Any]]:
    """(key, data) of every stage named ``name`` that filed report data, in run order.

    ``stage_data`` is report.json's ``stage_data`` (or a manifest's ``report_data``); ``stages`` the run's
    (key, name) pairs in order. Data keyed by the bare name (runs before position keys, or a stage called
    outside a run) comes back as ``[(name, data)]`` when no stage of that name filed by position.
    """
    found = [(key, stage_data[key]) for key, kind in stages if kind == name and key in stage_data]
    if not found and name in stage_data:
        found = [(name, stage_data[name])]
    return found


class LedgerEntry(BaseModel):
    """The student after one stage (the teacher row first)."""

    stage: str
    key: str | None = Field(None, description='position of the stage that wrote the row ("2-prune"); None in '
                                              "older runs")
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
    #: the other stages' report data (prune channel tables, quantize candidates, export parity, ...), keyed
    #: by stage position ("1-distill"); see the module docstring for the layout and older runs
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

    def stage_entries(self, name: str) -> list[tuple[str, Any]]:
        """(position key, data) of every stage named ``name`` with report data, in run order (the bare
        name as key for a report from before position keys)."""
        return stage_entries(self.stage_data, ((s.key, s.kind) for s in self.stages), name)

    def failed_stages(self) -> list[StageStatus]:
        return [s for s in self.stages if s.status == "failed"]
