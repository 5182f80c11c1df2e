"""The recipe's ``benchmark:`` and ``gate:`` sections (top level, run after the stages)::

    benchmark: {runtimes: [torch, onnxruntime, ort-mobile, executorch], threads: [1, 2], batch_sizes: [1, 32]}
    gate:      {max_accuracy_drop: 1.0}

Every runtime × thread count × batch size is timed with teacher and student interleaved in
one process (``edgekd.bench.latency``). The gate compares teacher and student on the same
runtime and the same validation samples.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from edgekd.config_base import StrictModel
from edgekd.runtimes.registry import RUNTIMES

#: the runtimes a recipe may name: a Literal of the registry's names, so an unknown one is refused
#: with every valid name listed and the JSON Schema gets an enum
RuntimeName = RUNTIMES.literal()
#: what ``benchmark.runtimes`` holds when a recipe does not list runtimes
DEFAULT_RUNTIMES: tuple[str, ...] = tuple(e.name for e in RUNTIMES.values() if e.default)
_RUNTIME_FILES = ", ".join(f"{e.name}: {e.suffix}" for e in RUNTIMES.values())


def _unique(value: list, what: str) -> list:
    repeated = sorted({str(v) for v in value if value.count(v) > 1})
    if repeated:
        raise ValueError(f"{what} listed more than once: {', '.join(repeated)}")
    return value


#: largest thread count and batch size a benchmark accepts (edge runtimes use far less)
_LIMITS = {"threads": 256, "batch_sizes": 4096}


class BenchmarkConfig(StrictModel):
    """Teacher against student on each runtime: latency, throughput, accuracy, size, memory."""

    runtimes: list[RuntimeName] = Field(  # type: ignore[valid-type]  (a Literal built from the registry)
        default_factory=lambda: list(DEFAULT_RUNTIMES), min_length=1,
        description=f"runtimes to measure on; each times the artifacts of its format ({_RUNTIME_FILES}). "
                    "One that is not installed is skipped with a note")
    threads: list[int] = Field(default_factory=lambda: [1], min_length=1,
                               description="intra-op thread counts, each measured separately")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], min_length=1,
                                   description="batch sizes, each measured separately (real validation samples)")
    warmup: int = Field(5, ge=0, le=10_000, description="untimed calls of each model before timing")
    min_time_s: float = Field(1.0, ge=0.0, le=3600.0,
                              description="keep timing until the slowest model has run this long (seconds; every model "
                                          "runs once per round) ...")
    min_iters: int = Field(20, ge=1, le=1_000_000, description="... and for at least this many rounds")
    accuracy_samples: int | None = Field(None, ge=1, description="validation samples for accuracy (None: all)")
    memory: bool = Field(True, description="measure peak memory of loading and running each model, in a "
                                           "fresh subprocess (costs a few seconds per model)")
    peak: bool = Field(True, description="time an FP32 GEMM at each thread count to show each model's "
                                         "share of the machine's achievable GFLOP/s")

    @field_validator("threads", "batch_sizes")
    @classmethod
    def _positive_unique(cls, value: list[int], info) -> list[int]:
        if any(v < 1 for v in value):
            raise ValueError(f"{info.field_name} must be at least 1")
        limit = _LIMITS[info.field_name]
        if any(v > limit for v in value):  # 1e9 samples would allocate hundreds of GiB at the end of a run
            raise ValueError(f"{info.field_name} must be at most {limit} (got {max(value):g})")
        return sorted(_unique(value, info.field_name))

    @field_validator("runtimes")
    @classmethod
    def _unique_runtimes(cls, value: list[str]) -> list[str]:
        return _unique(value, "runtimes")
