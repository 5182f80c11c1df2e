"""What a benchmark produced: the typed content of ``benchmark.json``.

Rows are flat on purpose (one per runtime × thread count × batch size × model for timings,
one per runtime × model for everything else) so the report, a spreadsheet or a notebook can
read them without walking a tree. Models are named by ``label``: ``teacher``, ``student`` and
``student-int8`` (a role, plus the precision when it is not FP32).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgekd.bench.accuracy import AccuracyMetrics
from edgekd.bench.latency import LatencyStats
from edgekd.bench.memory import MemoryUsage
from edgekd.bench.op_profile import OpProfile
from edgekd.bench.peak import GemmPeak

BENCHMARK_SCHEMA = "edgekd.benchmark/1"


def model_label(role: str, precision: str) -> str:
    return role if precision == "fp32" else f"{role}-{precision}"


class ModelEntry(BaseModel):
    """One model file as one runtime runs it."""

    runtime: str
    label: str
    role: Literal["teacher", "student"]
    precision: Literal["fp32", "int8"]
    fmt: str
    path: str = Field(..., description="relative to the run directory when inside it")
    file_bytes: int | None = None
    params: int | None = None
    macs: int | None = Field(None, description="multiply-accumulates for one sample")
    max_batch: int | None = Field(None, description="largest batch the file accepts (None: any)")
    accuracy: AccuracyMetrics | None = None
    memory: MemoryUsage | None = None
    memory_error: str | None = None
    error: str | None = Field(None, description="why the model could not be loaded or run")


class TimingEntry(BaseModel):
    """Measured latency of one model on one runtime at one thread count and batch size."""

    group: str = Field(..., description="the models timed interleaved with this one (a runtime, or 'files')")
    runtime: str
    threads: int
    batch_size: int
    label: str
    role: Literal["teacher", "student"]
    precision: Literal["fp32", "int8"]
    latency: LatencyStats | None = None
    speedup_vs_teacher: float | None = Field(
        None, description="teacher latency / this latency, the median of per-round ratios (the group's teacher "
                          "at the same threads and batch, timed interleaved)")
    gflops: float | None = Field(None, description="2 * MACs * batch / p50 latency (GOP/s for INT8)")
    peak_share: float | None = Field(None, description="gflops / the GEMM peak of this model's precision (FP32 "
                                                        "or INT8) at this thread count")
    error: str | None = Field(None, description="why this combination was not timed")

    @property
    def setting(self) -> str:
        return f"measured latency on {self.runtime}, {self.threads} thread{'s' * (self.threads != 1)}, " \
               f"batch {self.batch_size}"


class Note(BaseModel):
    """Something the reader must know: a runtime skipped, an artifact missing."""

    runtime: str | None = None
    message: str


class BenchmarkResult(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    schema_: Literal["edgekd.benchmark/1"] = Field(BENCHMARK_SCHEMA, alias="schema")
    created: str
    source: Literal["run", "files"] = Field(..., description="a recipe's run, or `edgekd benchmark` on files")
    settings: dict[str, Any]
    machine: dict[str, Any]
    timing_input: str = Field(..., description="what the timed batches hold")
    accuracy_reference: str | None = Field(None, description="the logits agreement and KL are measured against")
    accuracy_samples: int = 0
    reference_top1_pct: float | None = Field(None, description="top-1 of the reference (teacher) logits on the "
                                                                "same samples")
    peaks: list[GemmPeak] = Field(default_factory=list)
    models: list[ModelEntry] = Field(default_factory=list)
    timings: list[TimingEntry] = Field(default_factory=list)
    notes: list[Note] = Field(default_factory=list)
    op_profile: OpProfile | None = Field(None, description="ONNX Runtime's profiler on the deployed ONNX student: "
                                                           "kernel time per operator type")

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    # -- lookups the report uses ---------------------------------------------------------------
    def model(self, runtime: str, label: str) -> ModelEntry | None:
        return next((m for m in self.models if m.runtime == runtime and m.label == label), None)

    def peak(self, threads: int, precision: str = "fp32") -> GemmPeak | None:
        return next((p for p in self.peaks if p.threads == threads and p.precision == precision), None)

    def runtimes(self) -> list[str]:
        return list(dict.fromkeys(m.runtime for m in self.models))

    def labels(self) -> list[str]:
        order = {"teacher": 0, "student": 1}
        return sorted(dict.fromkeys(m.label for m in self.models), key=lambda lab: (order.get(lab, 2), lab))

    def settings_grid(self) -> list[tuple[int, int]]:
        """(threads, batch size) pairs that were timed, in order."""
        return sorted({(t.threads, t.batch_size) for t in self.timings})
