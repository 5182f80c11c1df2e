"""The speed- and accuracy-aware choice: measure every INT8 candidate against FP32, then decide.

Measured on this project's machines, the same static INT8 model was 1.2-2.1x *slower* than
FP32 with signed activations and 1.5-3.1x faster with unsigned ones, so nothing is assumed:
each candidate's accuracy is measured on the target runtime, all candidates and FP32 are timed
side by side (interleaved, one process), and ``choose`` ships the fastest candidate within the
accuracy tolerance, or FP32 with the reason why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgekd.errors import StageError, TargetUnreachableError
from edgekd.quantize.graph import NothingQuantizedError
from edgekd.runtimes.base import LoadedModel


@dataclass
class Candidate:
    """One model in the comparison: FP32 or an INT8 variant, with what was measured about it."""

    name: str
    precision: str  # "fp32" or "int8"
    path: Path | None
    settings: dict[str, Any] = field(default_factory=dict)
    excluded_nodes: list[str] = field(default_factory=list)
    accuracy: float | None = None
    latency_ms: float | None = None  # median milliseconds per batch
    latency: dict[str, Any] = field(default_factory=dict)
    #: FP32 time / this time, the median over the rounds where both ran (set by ``time_side_by_side``)
    paired_speedup: float | None = None
    size_bytes: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.accuracy is not None and self.latency_ms is not None

    def speedup_over(self, fp32: Candidate) -> float | None:
        if self is fp32:
            return 1.0
        if self.paired_speedup is not None:
            return self.paired_speedup
        if self.latency_ms is None or fp32.latency_ms is None or self.latency_ms <= 0:
            return None
        return fp32.latency_ms / self.latency_ms

    def drop_from(self, fp32: Candidate) -> float | None:
        if self.accuracy is None or fp32.accuracy is None:
            return None
        return fp32.accuracy - self.accuracy

    def to_json(self, fp32: Candidate, decision: str = "", root: Path | None = None) -> dict[str, Any]:
        speedup, drop = self.speedup_over(fp32), self.drop_from(fp32)
        path = self.path
        if path is not None and root is not None and path.is_relative_to(root):
            path = path.relative_to(root)
        size_ratio = (fp32.size_bytes / self.size_bytes) if self.size_bytes and fp32.size_bytes else None
        return {
            "name": self.name, "precision": self.precision, "path": str(path) if path else None,
            "settings": self.settings, "excluded_nodes": self.excluded_nodes,
            "accuracy": self.accuracy, "accuracy_drop": None if drop is None else round(drop, 4),
            "latency_ms": self.latency_ms, "speedup_vs_fp32": None if speedup is None else round(speedup, 3),
            "latency": self.latency, "size_bytes": self.size_bytes,
            "size_ratio_vs_fp32": None if size_ratio is None else round(size_ratio, 3),
            "error": self.error, "decision": decision,
        }


@dataclass
class Decision:
    shipped: Candidate
    reason: str
    within_tolerance: bool

    @property
    def ships_int8(self) -> bool:
        return self.shipped.precision == "int8"


@dataclass(frozen=True)
class Policy:
    """The rules ``choose`` applies (from ``QuantizeConfig``)."""

    max_accuracy_drop: float | None
    keep_if_faster: bool
    min_speedup: float
    if_tolerance_unmet: str = "keep_fp32"
    tie_tolerance: float = 0.03

    def accurate(self, c: Candidate, fp32: Candidate) -> bool:
        drop = c.drop_from(fp32)
        return self.max_accuracy_drop is None or (drop is not None and drop <= self.max_accuracy_drop + 1e-9)

    def fast(self, c: Candidate, fp32: Candidate) -> bool:
        speedup = c.speedup_over(fp32)
        return speedup is not None and speedup >= self.min_speedup


def _eligible(candidates: list[Candidate], fp32: Candidate, policy: Policy) -> list[Candidate]:
    """Measured candidates within the accuracy tolerance (and faster than FP32, with keep_if_faster)."""
    accurate = [c for c in candidates if c.ok and policy.accurate(c, fp32)]
    return [c for c in accurate if policy.fast(c, fp32)] if policy.keep_if_faster else accurate


def fastest_then_most_accurate(pool: list[Candidate], fp32: Candidate, policy: Policy) -> Candidate:
    """Timings a few percent apart are noise: among the candidates within ``tie_tolerance`` of the
    fastest, the most accurate (then the fastest)."""
    top = max(c.speedup_over(fp32) for c in pool)
    ties = [c for c in pool if c.speedup_over(fp32) * (1 + policy.tie_tolerance) >= top]
    return max(ties, key=lambda c: (c.accuracy, c.speedup_over(fp32)))


def choose(fp32: Candidate, candidates: list[Candidate], policy: Policy) -> Decision:
    """Pick what ships from measured numbers only. Raises ``TargetUnreachableError`` only when asked to."""
    measured = [c for c in candidates if c.ok]
    if not measured:
        errors = "; ".join(f"{c.name}: {c.error}" for c in candidates if c.error) or "none measured"
        return Decision(fp32, f"no INT8 candidate could be measured ({errors}); shipping FP32", True)
    accurate = [c for c in measured if policy.accurate(c, fp32)]
    eligible = _eligible(measured, fp32, policy)
    if eligible:
        best = fastest_then_most_accurate(eligible, fp32, policy)
        return Decision(best, f"{best.name} is the fastest INT8 candidate within the accuracy tolerance "
                              f"(ties within {policy.tie_tolerance:.0%} go to the most accurate): "
                              f"{_speed(best, fp32)}, {_drop(best, fp32)}", True)
    if accurate:  # only reachable with keep_if_faster: accurate ones exist but none is faster
        quickest = max(accurate, key=lambda c: c.speedup_over(fp32))
        return Decision(fp32, f"no INT8 candidate within the accuracy tolerance is at least {policy.min_speedup:g}x "
                              f"faster than FP32 (best: {quickest.name}, {_speed(quickest, fp32)}); "
                              f"shipping FP32 (keep_if_faster)", True)
    pool = [c for c in measured if policy.fast(c, fp32)] if policy.keep_if_faster else measured
    best_inaccurate = min(pool or measured, key=lambda c: (c.drop_from(fp32), -c.speedup_over(fp32)))
    summary = (f"no INT8 candidate meets max_accuracy_drop={policy.max_accuracy_drop:g} "
               f"(best: {best_inaccurate.name}, {_drop(best_inaccurate, fp32)}, {_speed(best_inaccurate, fp32)})")
    if policy.if_tolerance_unmet == "error":
        raise TargetUnreachableError(summary, hint="raise max_accuracy_drop, allow more float nodes "
                                                   "(sensitivity.max_float_nodes), or try method: qat")
    if policy.if_tolerance_unmet == "ship_best" and pool:
        return Decision(best_inaccurate, f"{summary}; shipping it anyway (if_tolerance_unmet=ship_best)", False)
    return Decision(fp32, f"{summary}; shipping FP32", False)


def _speed(c: Candidate, fp32: Candidate) -> str:
    # 3 significant figures: a small model's 0.004 ms is not "0.00 ms"; the ratio is the median of rounds timed
    # side by side (``paired_speedup``), which need not equal the ratio of the two medians printed before it
    ratio = c.speedup_over(fp32)
    paired = " (median of paired rounds)" if c is not fp32 and c.paired_speedup is not None else ""
    return (f"p50 {c.latency_ms:.3g} ms vs FP32 {fp32.latency_ms:.3g} ms, "
            f"{'?' if ratio is None else format(ratio, '.2f')}x{paired}")


def _drop(c: Candidate, fp32: Candidate) -> str:
    return f"top-1 {c.accuracy:.2f}% vs FP32 {fp32.accuracy:.2f}% (drop {c.drop_from(fp32):+.2f} pt)"


# -- measuring -----------------------------------------------------------------------------

#: samples per call when measuring accuracy
EVAL_BATCH = 64


def runtime_logits(model: LoadedModel, x: torch.Tensor | np.ndarray, batch_size: int = EVAL_BATCH) -> np.ndarray:
    arr = x.numpy() if isinstance(x, torch.Tensor) else x
    return model.run_in_batches(np.ascontiguousarray(arr, dtype=np.float32), batch_size)


def runtime_top1(model: LoadedModel, x: torch.Tensor, y: torch.Tensor, batch_size: int = EVAL_BATCH) -> float:
    """Top-1 (percent) of a model as loaded in its runtime: what the device will compute."""
    from edgekd.bench.accuracy import evaluate_loaded

    metrics, _ = evaluate_loaded(model, x.numpy(), y.numpy(), batch_size=batch_size)
    return float(metrics.top1_pct)


@dataclass
class Bench:
    """Where and how candidates are measured: a runtime, threads, a timing batch, validation data."""

    runtime: str
    threads: int
    batch_size: int
    x_val: torch.Tensor
    y_val: torch.Tensor
    warmup: int = 3
    min_time_s: float = 1.0
    min_iters: int = 10

    def load(self, path: Path) -> LoadedModel:
        from edgekd.runtimes.registry import get_runtime

        return get_runtime(self.runtime).load(path, self.threads)

    def accuracy(self, model: LoadedModel) -> float:
        return runtime_top1(model, self.x_val, self.y_val)

    def timing_batch(self) -> np.ndarray:
        # a real batch of the timed size; repeated when the validation split is smaller
        reps = -(-self.batch_size // len(self.x_val))
        x = torch.cat([self.x_val] * reps)[: self.batch_size]
        return np.ascontiguousarray(x.numpy(), dtype=np.float32)


def measure_accuracy(bench: Bench, candidate: Candidate) -> LoadedModel | None:
    """Load the candidate and set its accuracy; on a load/run failure record the error instead."""
    assert candidate.path is not None
    candidate.size_bytes = candidate.path.stat().st_size
    try:
        model = bench.load(candidate.path)
        candidate.accuracy = bench.accuracy(model)
    except Exception as exc:  # a runtime without a kernel for an INT8 op fails here, per candidate
        candidate.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        return None
    return model


def time_side_by_side(bench: Bench, loaded: dict[str, LoadedModel], candidates: dict[str, Candidate],
                      baseline: str = "fp32") -> None:
    """Time every loaded model interleaved with the others, in this process.

    Sets ``latency_ms`` (median per batch) and ``paired_speedup`` against ``baseline``: the median
    of per-round ratios, steadier than a ratio of medians on a shared machine.
    """
    from edgekd.bench.latency import measure_interleaved, paired_speedup

    batch = bench.timing_batch()
    calls: dict[str, Callable[[], object]] = {name: (lambda m=m: m.run(batch)) for name, m in loaded.items()}
    stats = measure_interleaved(calls, warmup=bench.warmup, min_time_s=bench.min_time_s,
                                min_iters=bench.min_iters, batch_size=bench.batch_size)
    for name, s in stats.items():
        cand = candidates[name]
        cand.latency_ms, cand.latency = float(s.p50_ms), s.to_json()
        if baseline in stats and name != baseline:
            cand.paired_speedup = paired_speedup(stats[baseline], s)


# -- the search ----------------------------------------------------------------------------

@dataclass
class CandidateBuild:
    """How to produce one INT8 candidate file (called once, lazily, inside the search)."""

    name: str
    settings: dict[str, Any]
    build: Callable[[], Path]


@dataclass
class SearchOutcome:
    runtime: str
    fmt: str  # "onnx" or "pte"
    threads: int
    batch_size: int
    fp32: Candidate
    candidates: list[Candidate]
    decision: Decision
    sensitivity: Any = None  # SensitivityResult when the accuracy-aware fallback ran
    notes: list[str] = field(default_factory=list)

    def to_json(self, root: Path | None = None) -> dict[str, Any]:
        """JSON-able: every candidate's latency, accuracy, size and the decision; paths relative to ``root``."""
        shipped = self.decision.shipped
        return {
            "runtime": self.runtime, "format": self.fmt, "threads": self.threads, "batch_size": self.batch_size,
            "fp32": self.fp32.to_json(self.fp32, "shipped" if shipped is self.fp32 else "baseline", root),
            "candidates": [c.to_json(self.fp32, "shipped" if c is shipped else "not shipped", root)
                           for c in self.candidates],
            "shipped": shipped.name, "shipped_precision": shipped.precision,
            "within_tolerance": self.decision.within_tolerance, "reason": self.decision.reason,
            "sensitivity": self.sensitivity.to_json() if self.sensitivity is not None else None,
            "notes": self.notes,
        }


#: given the over-tolerance candidate to repair, return a SensitivityResult (edgekd.quantize.sensitivity)
Fallback = Callable[[Candidate], Any]


def run_search(bench: Bench, policy: Policy, fp32: Candidate, builds: list[CandidateBuild], *, fmt: str,
               fallback: Fallback | None = None, notes: list[str] | None = None) -> SearchOutcome:
    """Build, measure and time every candidate against FP32, repair accuracy if needed, then ``choose``."""
    notes = list(notes or [])
    fp32_model = measure_accuracy(bench, fp32)
    if fp32_model is None:
        raise StageError(f"the FP32 model does not run on {bench.runtime}: {fp32.error}")
    loaded: dict[str, LoadedModel] = {fp32.name: fp32_model}
    candidates: list[Candidate] = []
    for item in builds:
        cand = Candidate(name=item.name, precision="int8", path=None, settings=item.settings)
        candidates.append(cand)
        try:
            cand.path = item.build()
        except NothingQuantizedError:
            raise
        except StageError as exc:
            cand.error = exc.message
            continue
        model = measure_accuracy(bench, cand)
        if model is not None:
            loaded[cand.name] = model
    everyone = {c.name: c for c in [fp32, *candidates]}
    sensitivity = None
    if len(loaded) > 1:
        time_side_by_side(bench, loaded, everyone)
    if policy.max_accuracy_drop is not None and fallback is not None and not _eligible(candidates, fp32, policy):
        # repair the candidate worth shipping: of the (tied) fastest, the most accurate, which needs
        # the fewest float nodes (only those that beat FP32 count, when speed matters)
        timed = [c for c in candidates if c.ok]
        pool = [c for c in timed if policy.fast(c, fp32)] if policy.keep_if_faster else timed
        if pool:
            target = fastest_then_most_accurate(pool, fp32, policy)
            sensitivity = fallback(target)
            if sensitivity.best is not None and sensitivity.best.error is None:
                candidates.append(sensitivity.best)
                everyone[sensitivity.best.name] = sensitivity.best
                loaded[sensitivity.best.name] = bench.load(sensitivity.best.path)
                # one more round with every model, so all the numbers compared come from the same round
                time_side_by_side(bench, loaded, everyone)
            if not sensitivity.met:
                notes.append(f"keeping up to {len(sensitivity.trail)} nodes of {target.name} in float did not "
                             f"bring the drop within {policy.max_accuracy_drop:g} pt; best found kept in the table")
        elif timed:
            notes.append("no INT8 candidate was faster than FP32, so the accuracy-aware fallback was not run")
    decision = choose(fp32, candidates, policy)
    return SearchOutcome(runtime=bench.runtime, fmt=fmt, threads=bench.threads, batch_size=bench.batch_size,
                         fp32=fp32, candidates=candidates, decision=decision, sensitivity=sensitivity, notes=notes)

