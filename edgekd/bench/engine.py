"""The benchmark loop shared by the ``benchmark`` stage and the ``edgekd benchmark`` command.

Candidates come in groups timed together: the stage makes one group per runtime (teacher,
student and INT8 student files of that runtime's format); ``edgekd benchmark`` makes one group
of the two files it is given, whatever their runtimes. For each group and thread count: load
every candidate once, check each runs, score accuracy (at the largest thread count only: the
thread count does not change the arithmetic, and more threads finish sooner), then for each
batch size time all of the group's candidates interleaved with the harness; drop the loaded
models before the next thread count (ExecuTorch's thread pool is process-wide and may only be
resized while no model holds it).
Peak memory is measured per file in a fresh subprocess afterwards (several at once: a process's
peak RSS does not depend on what runs beside it, unlike its latency), and the FP32 and INT8 GEMM
peaks once per thread count: each model's achieved rate is compared with its own precision's.
"""

from __future__ import annotations

import functools
import gc
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from edgekd.bench.accuracy import evaluate_loaded, metrics_from_logits
from edgekd.bench.config import BenchmarkConfig
from edgekd.bench.latency import measure_interleaved, paired_speedup
from edgekd.bench.machine import machine_facts
from edgekd.bench.memory import measure_peak_memory
from edgekd.bench.peak import GemmPeak, achieved_gflops, at_least_fewer_threads, fp32_gemm_peak, int8_gemm_peak
from edgekd.bench.results import BenchmarkResult, ModelEntry, Note, TimingEntry, model_label
from edgekd.errors import EdgekdError
from edgekd.models.portable import trusted_now
from edgekd.runtimes.base import LoadedModel
from edgekd.runtimes.registry import RUNTIMES, get_runtime

#: the largest batch used to score accuracy (capped by a file's max batch)
ACCURACY_BATCH = 64
#: memory-measuring child processes run at once (each imports a runtime and loads one model)
MEMORY_WORKERS = 4


@dataclass
class Candidate:
    """One model file to run on one runtime."""

    runtime: str
    role: str
    precision: str
    path: Path
    params: int | None = None
    macs: int | None = None

    @property
    def label(self) -> str:
        return model_label(self.role, self.precision)


@dataclass
class TimingGroup:
    """Candidates timed interleaved with each other; speed-ups are against the group's teacher."""

    name: str
    candidates: list[Candidate]


@dataclass
class BenchInputs:
    """Samples for timing and accuracy. ``labels`` and ``reference_logits`` may be None (no dataset)."""

    x: np.ndarray
    labels: np.ndarray | None
    reference_logits: np.ndarray | None
    description: str
    reference_description: str | None

    def timing_batch(self, batch_size: int) -> np.ndarray:
        """``batch_size`` samples (repeated when there are fewer), contiguous float32."""
        reps = -(-batch_size // len(self.x))
        return np.ascontiguousarray(np.concatenate([self.x] * reps)[:batch_size], dtype=np.float32)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x.shape[1:])


def _first_line(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, EdgekdError) else str(exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0][:500]


def _rel(path: Path, root: Path | None) -> str:
    path = Path(path)
    if root is not None and path.resolve().is_relative_to(root.resolve()):
        return str(path.resolve().relative_to(root.resolve()))
    return str(path)


class _Bench:
    def __init__(self, config: BenchmarkConfig, inputs: BenchInputs, root: Path | None,
                 console: Console | None) -> None:
        self.config = config
        self.inputs = inputs
        self.root = root
        self.console = console or Console(stderr=True, quiet=True)
        self.models: dict[tuple[str, str], ModelEntry] = {}
        self.timings: list[TimingEntry] = []
        self.peaks: dict[tuple[str, int], GemmPeak] = {}
        self.memory_todo: list[Candidate] = []
        if config.peak:
            for t in config.threads:
                self.peaks[("fp32", t)] = fp32_gemm_peak(t)
                try:
                    self.peaks[("int8", t)] = int8_gemm_peak(t)
                except ImportError:  # no onnxruntime: INT8 models get no share rather than the FP32 one
                    pass
            self.peaks = at_least_fewer_threads(self.peaks)

    def entry(self, c: Candidate) -> ModelEntry:
        return self.models[(c.runtime, c.label)]

    # -- one group ---------------------------------------------------------------------------
    def run_group(self, group: TimingGroup) -> None:
        for c in group.candidates:
            self.models[(c.runtime, c.label)] = ModelEntry(
                runtime=c.runtime, label=c.label, role=c.role, precision=c.precision, fmt=RUNTIMES[c.runtime].fmt,
                path=_rel(c.path, self.root), file_bytes=c.path.stat().st_size if c.path.is_file() else None,
                params=c.params, macs=c.macs)
        most = max(self.config.threads)
        for threads in self.config.threads:
            self._at_threads(group, threads, score_accuracy=threads == most)
            gc.collect()  # the loaded models are gone: an ExecuTorch pool may now be resized
        if self.config.memory:  # measured after every group's timing, all in one pool (measure_memory)
            self.memory_todo += [c for c in group.candidates if self.entry(c).error is None]

    def _load(self, group: TimingGroup, threads: int) -> dict[str, LoadedModel]:
        loaded: dict[str, LoadedModel] = {}
        probe = self.inputs.timing_batch(1)
        for c in group.candidates:
            entry = self.entry(c)
            if entry.error is not None:
                continue
            try:
                model = get_runtime(c.runtime).load(c.path, threads)
                model.run(probe)  # a file that loads but cannot run fails here, not mid-timing
            except EdgekdError as exc:
                entry.error = _first_line(exc)
                self.console.print(f"    [yellow]{c.runtime}: {c.label} not measured:[/] {entry.error}")
                continue
            entry.max_batch = model.max_batch
            loaded[c.label] = model
        return loaded

    def _at_threads(self, group: TimingGroup, threads: int, *, score_accuracy: bool) -> None:
        loaded = self._load(group, threads)
        try:
            if score_accuracy:
                for c in group.candidates:
                    if c.label in loaded:
                        metrics, _ = evaluate_loaded(loaded[c.label], self.inputs.x, self.inputs.labels,
                                                     self.inputs.reference_logits, batch_size=ACCURACY_BATCH)
                        self.entry(c).accuracy = metrics
            for batch_size in self.config.batch_sizes:
                self._time(group, loaded, threads, batch_size)
        finally:
            loaded.clear()

    def _time(self, group: TimingGroup, loaded: dict[str, LoadedModel], threads: int, batch_size: int) -> None:
        batch = self.inputs.timing_batch(batch_size)
        entries: dict[str, TimingEntry] = {}
        calls: dict[str, Callable[[], object]] = {}
        for c in group.candidates:
            entry = TimingEntry(group=group.name, runtime=c.runtime, threads=threads, batch_size=batch_size,
                                label=c.label, role=c.role, precision=c.precision)
            model = loaded.get(c.label)
            if model is None:
                entry.error = self.entry(c).error or "not loaded"
            elif model.max_batch is not None and batch_size > model.max_batch:
                entry.error = f"the file accepts batches of at most {model.max_batch}"
            else:
                calls[c.label] = functools.partial(model.run, batch)
            entries[c.label] = entry
        if calls:
            stats = measure_interleaved(calls, warmup=self.config.warmup, min_time_s=self.config.min_time_s,
                                        min_iters=self.config.min_iters, batch_size=batch_size)
            teacher = stats.get("teacher")
            for c in group.candidates:
                s = stats.get(c.label)
                if s is None:
                    continue
                entry = entries[c.label]
                entry.latency = s
                entry.speedup_vs_teacher = paired_speedup(teacher, s) if teacher is not None else None
                entry.gflops = achieved_gflops(c.macs, batch_size, s.p50_ms)
                peak = self.peaks.get((c.precision, threads))  # INT8 work against the INT8 ceiling
                if entry.gflops is not None and peak is not None:
                    entry.peak_share = entry.gflops / peak.gflops
            self.console.print(f"    {group.name:<11} {threads}t bs{batch_size:<4} " + ", ".join(
                f"{label} {entries[label].latency.p50_ms:.3f} ms" + (
                    f" ({entries[label].speedup_vs_teacher:.2f}x)" if label != "teacher" and teacher else "")
                for label in stats), highlight=False)
        self.timings.extend(entries.values())

    def measure_memory(self) -> None:
        """Peak memory of every model timed without error, each in its own child process (``measure_peak_memory``),
        ``MEMORY_WORKERS`` at a time across all runtimes: a child's RSS is its own, so running them side by side
        changes no figure, and pooling every runtime's models keeps both cores busy (one runtime's two or three
        models at a time left one idle in every other round)."""
        threads = self.config.threads[0]
        largest = max(self.config.batch_sizes)
        todo, self.memory_todo = self.memory_todo, []

        # read here: the pool's threads do not see this thread's context variables
        factories = trusted_now()

        def measure(c: Candidate) -> None:
            entry = self.entry(c)
            try:
                entry.memory = measure_peak_memory(c.path, c.runtime, batch_size=min(largest, entry.max_batch or largest),
                                                   threads=threads, sample_shape=self.inputs.sample_shape,
                                                   factories=factories)
            except EdgekdError as exc:
                entry.memory_error = _first_line(exc)

        if not todo:
            return
        # each measurement is its own child process: threads here only wait on them
        with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1, MEMORY_WORKERS))) as pool:
            list(pool.map(measure, todo))


def unavailable_note(runtime: str) -> Note | None:
    """The one-line note for a runtime that is not installed (None when it is)."""
    entry = RUNTIMES[runtime]
    if entry.available():
        return None
    return Note(runtime=runtime, message=f"{runtime} is not installed, skipped ({entry.install})")


def run_benchmark(groups: list[TimingGroup], config: BenchmarkConfig, inputs: BenchInputs, *,
                  source: str, root: Path | None = None, notes: list[Note] | None = None,
                  console: Console | None = None) -> BenchmarkResult:
    """Measure every group. Candidates of a runtime that is not installed become a note, never an error."""
    import torch

    notes = list(notes or [])
    # the torch runtime sets PyTorch's process-wide thread count per model: restore it afterwards
    torch_threads = torch.get_num_threads()
    try:
        bench = _Bench(config, inputs, root, console)
        for group in groups:
            runnable = []
            for c in group.candidates:
                note = unavailable_note(c.runtime)
                if note is None:
                    runnable.append(c)
                elif note not in notes:
                    notes.append(note)
            if runnable:
                bench.run_group(TimingGroup(group.name, runnable))
        bench.measure_memory()
    finally:
        torch.set_num_threads(torch_threads)
    settings: dict[str, Any] = config.model_dump(mode="json")
    reference_top1 = None
    if inputs.reference_logits is not None and inputs.labels is not None:
        reference_top1 = metrics_from_logits(inputs.reference_logits, inputs.labels, None).top1_pct
    return BenchmarkResult(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), source=source, settings=settings,
        machine=machine_facts(), timing_input=inputs.description, accuracy_reference=inputs.reference_description,
        accuracy_samples=int(len(inputs.x)), reference_top1_pct=reference_top1, peaks=list(bench.peaks.values()),
        models=list(bench.models.values()), timings=bench.timings, notes=notes)
