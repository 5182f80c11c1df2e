"""The latency harness: warm-up, then interleaved timed rounds, then robust statistics.

Why interleaved: on a shared or thermally throttled machine the speed drifts over seconds.
Timing the teacher for 10 s and then the student for 10 s puts the drift into the ratio;
calling them in turn (teacher, student, teacher, student, ...) exposes both to the same drift,
so it cancels in the comparison. The start of each round rotates (A B C, B C A, C A B, ...)
so no model always runs right after the same neighbour (caches, frequency ramps).

One timed sample is one call of the candidate (one batch). Every candidate gets the same number
of rounds (so call i of each ran side by side). Stop rule: at least ``min_iters`` rounds, and the
slowest candidate has ``min_time_s`` seconds of timed calls; a 0.1 ms student next to a 20 ms
teacher thus gets as many samples as the teacher, not 200x the wall time. The garbage collector
is paused during the timed rounds (as ``timeit`` does) so a collection triggered by one
candidate's allocations is not billed to another.

Usage::

    stats = measure_interleaved({"teacher": lambda: t.run(x), "student": lambda: s.run(x)},
                                warmup=5, min_time_s=1.0, min_iters=20, batch_size=len(x))
    stats["student"].p50_ms, paired_speedup(stats["teacher"], stats["student"])
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

#: a percentile q is estimated only from at least 1 / (1 - q) timed calls, so that some call lies beyond it;
#: below that the "percentile" is just the slowest call (p99 of 10 calls is their maximum)
MIN_ITERS_P90 = 10
MIN_ITERS_P99 = 100


class LatencyStats(BaseModel):
    """Latency of one candidate: per-call (per-batch) statistics in milliseconds, and throughput.

    ``p99_ms`` is None when fewer than ``MIN_ITERS_P99`` calls were timed;
    ``p90_ms`` is always set (plots and the prune stage read it), but ``p90_estimated`` says whether
    ``MIN_ITERS_P90`` calls back it.
    """

    model_config = ConfigDict(frozen=True)

    iters: int = Field(..., description="timed calls")
    warmup: int = Field(..., description="untimed calls before timing")
    batch_size: int = Field(..., description="samples per call")
    p50_ms: float
    p90_ms: float
    p99_ms: float | None = Field(None, description=f"99th percentile; None below {MIN_ITERS_P99} timed calls")
    mean_ms: float
    std_ms: float = Field(..., description="sample standard deviation of the per-call times")
    min_ms: float
    max_ms: float
    total_s: float = Field(..., description="sum of the timed calls, seconds")
    throughput_sps: float = Field(..., description="samples per second, batch_size / mean latency")
    #: every timed call in order; call i of two candidates timed together ran in the same round
    samples_ms: list[float] = Field(default_factory=list, exclude=True, repr=False)

    @classmethod
    def from_samples(cls, seconds: list[float], *, warmup: int, batch_size: int) -> LatencyStats:
        if not seconds:
            raise ValueError("no timed samples")
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        mean = float(ms.mean())
        return cls(iters=len(ms), warmup=warmup, batch_size=batch_size, p50_ms=float(p50), p90_ms=float(p90),
                   p99_ms=float(p99) if len(ms) >= MIN_ITERS_P99 else None, mean_ms=mean, std_ms=float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
                   min_ms=float(ms.min()), max_ms=float(ms.max()), total_s=float(ms.sum() / 1e3),
                   throughput_sps=batch_size / (mean / 1e3) if mean > 0 else float("inf"),
                   samples_ms=[float(v) for v in ms])

    @property
    def p90_estimated(self) -> bool:
        return self.iters >= MIN_ITERS_P90

    def to_json(self) -> dict[str, Any]:
        """The statistics without the raw samples (what benchmark.json stores)."""
        return self.model_dump(mode="json")


def _round_order(names: list[str], round_index: int) -> list[str]:
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def measure_interleaved(candidates: Mapping[str, Callable[[], object]], *, warmup: int = 5,
                        min_time_s: float = 1.0, min_iters: int = 20, batch_size: int = 1,
                        max_time_s: float | None = None,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, LatencyStats]:
    """Time every candidate in interleaved rounds in this process; statistics per candidate name.

    ``warmup`` untimed calls of each (interleaved too), then rounds in which each candidate is
    called once, until there were ``min_iters`` rounds and the slowest candidate has ``min_time_s``
    seconds of timed calls.
    ``max_time_s`` (wall clock of the timed phase) stops earlier, after at least one round, for
    callers that need a bound more than precision. ``batch_size`` only feeds the throughput.
    ``clock`` returns seconds (``time.perf_counter``; another timer, e.g. one that syncs a GPU).
    """
    if not candidates:
        raise ValueError("measure_interleaved needs at least one candidate")
    if warmup < 0 or min_iters < 1 or min_time_s < 0 or batch_size < 1:
        raise ValueError("warmup >= 0, min_iters >= 1, min_time_s >= 0 and batch_size >= 1 are required")
    names = list(candidates)
    for r in range(warmup):
        for name in _round_order(names, r):
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    spent = dict.fromkeys(names, 0.0)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        started = clock()
        r = 0
        while True:
            for name in _round_order(names, r):
                call = candidates[name]
                t0 = clock()
                call()
                dt = clock() - t0
                times[name].append(dt)
                spent[name] += dt
            r += 1
            if r >= min_iters and max(spent.values()) >= min_time_s:
                break
            if max_time_s is not None and clock() - started >= max_time_s:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: LatencyStats.from_samples(times[name], warmup=warmup, batch_size=batch_size) for name in names}


def measure(fn: Callable[[], object], **kwargs: Any) -> LatencyStats:
    """One candidate alone (same rules as ``measure_interleaved``)."""
    return measure_interleaved({"model": fn}, **kwargs)["model"]


def paired_speedup(baseline: LatencyStats, candidate: LatencyStats) -> float:
    """How many times faster ``candidate`` is than ``baseline``: the median over rounds of the ratio
    of their calls in the same round.

    A burst of load on a shared machine hits both calls of a round alike, so the per-round ratio
    is steadier than the ratio of two medians. Both must come from one ``measure_interleaved``.
    """
    a, b = baseline.samples_ms, candidate.samples_ms
    if not a or len(a) != len(b):
        return baseline.p50_ms / candidate.p50_ms
    ratios = np.asarray(a) / np.maximum(np.asarray(b), 1e-12)
    return float(np.median(ratios))
