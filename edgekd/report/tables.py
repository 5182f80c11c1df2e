"""The report's tables as plain rows of text, shared by the Markdown, HTML and terminal renderers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgekd.report.schema import Report


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    caption: str = ""


def fmt_count(n: int | float | None) -> str:
    if n is None:
        return "—"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:g}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for div, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n} B"


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def fmt_num(v: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "—" if v is None else f"{format(v, spec)}{suffix}"


#: runtimes whose files are optimised for another CPU than the one that timed them (x86 hosts)
ARM_OPTIMISED = {"ort-mobile": ".ort: the graph is optimised for ARM (ORT Mobile), timed here on x86 with the CPU "
                               "provider, so it reads slower than the .onnx on onnxruntime; time it on the phone"}


def _x86(report: Report) -> bool:
    arch = str((report.machine or {}).get("arch") or "").lower()
    return arch in ("x86_64", "amd64", "i386", "i686") or not arch


#: runtimes whose file edgekd ships in FP32 only, and why (said where another runtime got an INT8 file)
FP32_ONLY_FORMATS = {
    "ort-mobile": "the .ort stays FP32: edgekd makes no INT8 .ort, since its speed on a phone cannot be measured "
                  "here (ARM kernels); `python -m onnxruntime.tools.convert_onnx_models_to_ort student.int8.onnx` "
                  "makes one from the shipped INT8 ONNX file, to time on the device",
}


def quantize_outcomes(report: Report) -> list[dict]:
    """Every quantize search of the run, one per file format (each stage's ``method`` and its ``also``
    entries), as report.json holds them: ``{runtime, format, batch_size, shipped_precision, reason, ...}``."""
    outcomes = []
    for _, data in report.stage_entries("quantize"):
        if isinstance(data, dict):
            outcomes += [o for o in [data, *(data.get("also") or [])] if isinstance(o, dict) and o.get("runtime")]
    return outcomes


def runtime_notes(report: Report, runtimes: list[str]) -> list[str]:
    """What a reader must know about a runtime's rows on this machine (.ort files timed on x86)."""
    return [f"{r}: {ARM_OPTIMISED[r]}" for r in dict.fromkeys(runtimes) if r in ARM_OPTIMISED and _x86(report)]


def _runtime_cell(report: Report, runtime: str) -> str:
    return f"{runtime} (ARM-optimised, timed on x86)" if runtime in ARM_OPTIMISED and _x86(report) else runtime


def deployed_table(report: Report) -> Table:
    """What ships, one row per target runtime: the student file that runtime runs (the INT8 file where the
    quantize stage shipped one for its format, else the FP32 one), its p50 at batch 1 and at the largest batch,
    its speed-up over the teacher on that runtime, and its top-1 on the held-out split."""
    bench = report.benchmark
    batches = sorted({b for _, b in bench.settings_grid()}) if bench else []
    threads = min((t for t, _ in bench.settings_grid()), default=1) if bench else 1
    small, large = (batches[0], batches[-1]) if batches else (1, 1)
    split = report.accuracy_splits.get("benchmark.accuracy", "test")
    heads = ["runtime", "file", "precision", f"p50 ms, batch {small}", f"speed-up, batch {small}"]
    if large != small:
        heads += [f"p50 ms, batch {large}", f"speed-up, batch {large}"]
    heads += [f"top-1 ({split})", "teacher top-1"]
    t = Table("What ships: the deployed student per runtime", heads,
              caption=f"{threads} thread{'s' * (threads != 1)}; speed-up: teacher / student on the same runtime, "
                      f"timed interleaved (median of per-round ratios); other thread counts in the Latency table")
    if bench is None:
        return t
    for runtime in bench.runtimes():
        entry = bench.model(runtime, "student-int8")
        if entry is None or entry.error is not None:
            entry = bench.model(runtime, "student")
        if entry is None:
            continue
        teacher = bench.model(runtime, "teacher")
        row = [_runtime_cell(report, runtime), entry.path, entry.precision.upper()]
        for batch in ([small, large] if large != small else [small]):
            timing = next((e for e in bench.timings if e.runtime == runtime and e.label == entry.label
                           and e.threads == threads and e.batch_size == batch), None)
            if timing is None or timing.latency is None:
                row += ["—" if timing is None else f"not timed: {timing.error or '?'}", "—"]
            else:
                row += [fmt_ms(timing.latency.p50_ms), fmt_num(timing.speedup_vs_teacher, ".2f", "x")]
        row += [fmt_num(entry.accuracy.top1_pct if entry.accuracy else None, ".2f", "%"),
                fmt_num(teacher.accuracy.top1_pct if teacher and teacher.accuracy else None, ".2f", "%")]
        t.rows.append(row)
    notes = runtime_notes(report, bench.runtimes())
    quantized = bool(report.stage_entries("quantize")) or any(
        bench.model(o, "student-int8") is not None for o in bench.runtimes())
    fp32_only = [r for r in bench.runtimes() if r in FP32_ONLY_FORMATS and bench.model(r, "student") is not None
                 and quantized]
    notes += [f"{r}: {FP32_ONLY_FORMATS[r]}" for r in fp32_only]
    # where the quantize stage kept FP32 for a runtime's format, its reason with the numbers
    notes += [f"{o.get('runtime')}: FP32 stayed: {o['reason']}" for o in quantize_outcomes(report)
              if o.get("shipped_precision") == "fp32" and o.get("reason")]
    if notes:
        t.caption += "; " + "; ".join(notes)
    return t


def headline_table(report: Report) -> Table:
    t = Table("Teacher vs student", ["runtime", "threads", "batch", "model", "teacher p50 ms", "p50 ms", "speed-up",
                                     "teacher top-1", "top-1"],
              caption="measured latency on the named runtime, thread count and batch size; speed-up is the median "
                      "of per-round ratios, teacher and student timed interleaved in one process")
    for c in report.comparisons:
        t.rows.append([c.runtime, str(c.threads), str(c.batch_size), c.model, fmt_ms(c.teacher_p50_ms),
                       fmt_ms(c.p50_ms), fmt_num(c.speedup, ".2f", "x"), fmt_num(c.teacher_top1_pct, ".2f", "%"),
                       fmt_num(c.top1_pct, ".2f", "%")])
    notes = runtime_notes(report, [c.runtime for c in report.comparisons])
    if notes:
        t.caption += "; " + "; ".join(notes)
    return t


def peak_share(report: Report, e: Any) -> float | None:
    """A timing's achieved rate over the GEMM peak of its own precision at its thread count (None without one).

    Recomputed from ``peaks`` rather than read from the entry: runs from before the INT8 probe divided INT8
    rates by the FP32 peak (150-175% "of peak")."""
    bench = report.benchmark
    peak = bench.peak(e.threads, e.precision) if bench else None
    return None if e.gflops is None or peak is None or peak.gflops <= 0 else e.gflops / peak.gflops


def latency_table(report: Report) -> Table:
    from edgekd.bench.latency import MIN_ITERS_P90, MIN_ITERS_P99

    t = Table("Latency", ["runtime", "threads", "batch", "model", "p50 ms", "p90 ms", "p99 ms", "mean ± std ms",
                          "samples/s", "iters", "GFLOP/s", "% of GEMM peak"],
              caption=f"per call (one batch); iters: timed calls per cell; p90 needs {MIN_ITERS_P90} and p99 "
                      f"{MIN_ITERS_P99} timed calls (fewer leave no call beyond the percentile: it would be the "
                      f"slowest call), else '—'; samples/s = batch / mean; GFLOP/s = 2·MACs·batch / p50 "
                      f"(GOP/s for INT8); % of peak: against the fastest GEMM of the model's own precision "
                      f"(FP32: the faster of torch.mm and ONNX Runtime MatMul; INT8: u8×s8 MatMulInteger on ONNX Runtime) at the same thread count")
    bench = report.benchmark
    if bench is None:
        return t
    for e in bench.timings:
        if e.latency is None:
            t.rows.append([e.runtime, str(e.threads), str(e.batch_size), e.label, "not timed: " + (e.error or "?"),
                           *[""] * 7])
            continue
        s = e.latency
        share = peak_share(report, e)
        t.rows.append([e.runtime, str(e.threads), str(e.batch_size), e.label, fmt_ms(s.p50_ms),
                       fmt_ms(s.p90_ms) if s.iters >= MIN_ITERS_P90 else "—",
                       fmt_ms(s.p99_ms) if s.iters >= MIN_ITERS_P99 else "—",
                       f"{fmt_ms(s.mean_ms)} ± {fmt_ms(s.std_ms)}", f"{s.throughput_sps:,.0f}",
                       str(s.iters), fmt_num(e.gflops, ".2f"),
                       fmt_num(None if share is None else 100 * share, ".1f", "%")])
    notes = runtime_notes(report, [e.runtime for e in bench.timings])
    if notes:
        t.caption += "; " + "; ".join(notes)
    return t


def op_profile_table(report: Report) -> Table | None:
    """ONNX Runtime's profiler on the deployed ONNX student: kernel time per operator type, largest first."""
    prof = report.benchmark.op_profile if report.benchmark else None
    if prof is None:
        return None
    t = Table(f"Where the time goes: operator profile of the deployed student ({prof.runtime})",
              ["operator", "nodes", "ms per call", "share"],
              caption=f"{prof.path} ({prof.model}), {prof.threads} thread{'s' * (prof.threads != 1)}, batch "
                      f"{prof.batch_size}, ONNX Runtime's profiler (SessionOptions.enable_profiling) over "
                      f"{prof.calls} calls after a warm-up; kernel time {fmt_ms(prof.kernel_ms_per_call)} ms per "
                      f"call (the profiled session runs apart from the timed ones: profiling adds overhead)")
    for op in prof.ops:
        t.rows.append([op.op_type, str(op.nodes), f"{op.ms_per_call:.4f}", f"{100 * op.share:.1f}%"])
    return t


def accuracy_table(report: Report) -> Table:
    bench = report.benchmark
    ref = bench.accuracy_reference if bench else None
    t = Table("Accuracy on each runtime", ["runtime", "model", "top-1", "agreement with teacher", "KL(teacher‖model)",
                                           "samples"],
              caption=f"{report.accuracy_splits.get('benchmark.accuracy', 'val')} split; agreement and KL against "
                      f"{ref or 'the teacher'}")
    if bench is None:
        return t
    for m in bench.models:
        a = m.accuracy
        if a is None:
            t.rows.append([m.runtime, m.label, "not measured: " + (m.error or "?"), "", "", ""])
            continue
        t.rows.append([m.runtime, m.label, fmt_num(a.top1_pct, ".2f", "%"), fmt_num(a.agreement_pct, ".2f", "%"),
                       fmt_num(a.kl_mean, ".2e"), str(a.samples)])
    return t


def models_table(report: Report) -> Table:
    t = Table("Size and memory", ["runtime", "model", "file", "file size", "params", "MACs / sample",
                                  "peak RSS", "added by model"],
              caption="memory: a fresh process loads the file and runs one batch; 'added by model' is its peak RSS "
                      "minus its RSS just before loading (interpreter and runtime library already imported)")
    bench = report.benchmark
    if bench is None:
        return t
    for m in bench.models:
        mem = m.memory
        t.rows.append([m.runtime, m.label, m.path, fmt_bytes(m.file_bytes), fmt_count(m.params), fmt_count(m.macs),
                       f"{mem.peak_mib:.1f} MiB" if mem else (m.memory_error or "—"),
                       f"{mem.model_mib:.1f} MiB (batch {mem.batch_size})" if mem else "—"])
    return t


def peak_table(report: Report) -> Table:
    t = Table("Machine limit (GEMM peak per precision)", ["precision", "threads", "GFLOP/s (GOP/s for INT8)",
                                                          "matrix n", "through"],
              caption="fastest n×n matrix product: an achievable peak, not the datasheet's; each model's rate in the "
                      "Latency table is a share of its own precision's peak")
    if report.benchmark is not None:
        for p in report.benchmark.peaks:
            t.rows.append([p.precision.upper(), str(p.threads), f"{p.gflops:.1f}", str(p.size), p.backend])
    return t


def _notes_text(notes: dict[str, Any]) -> str:
    parts = []
    for k, v in notes.items():
        if v is None or isinstance(v, (dict, list)) and not v:
            continue
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        parts.append(f"{k}: {v}")
    return "; ".join(parts)


def ledger_table(report: Report) -> Table:
    t = Table("Stage ledger (the student after each stage)", ["stage", "params", "MACs / sample", "val top-1",
                                                              "test top-1", "parity", "notes"],
              caption="accuracy of the PyTorch model (quantize: of the shipped file, on val); val: the split "
                      "decisions read; test: held out from every decision; parity: exported files against "
                      "PyTorch on real validation samples")
    for row in report.ledger:
        t.rows.append([row.stage, fmt_count(row.params), fmt_count(row.macs), fmt_num(row.val_accuracy, ".2f", "%"),
                       fmt_num(row.test_accuracy, ".2f", "%"), row.parity or "—", _notes_text(row.notes)])
    return t


def stages_table(report: Report) -> Table:
    t = Table("Stages", ["#", "stage", "status", "duration", "error"])
    for s in report.stages:
        t.rows.append([str(s.index), s.key, s.status, fmt_num(s.duration_s, ".1f", " s"), s.error or ""])
    return t


def machine_rows(report: Report) -> list[tuple[str, str]]:
    m = report.machine
    rows = [("CPU", f"{m.get('cpu_model') or 'unknown'} ({m.get('arch', '?')})"),
            ("cores", f"{m.get('usable_cores')} usable / {m.get('logical_cores')} logical / "
                      f"{m.get('physical_cores')} physical"),
            ("ISA", " ".join(k for k, v in (m.get("isa") or {}).items() if v) or "—"),
            ("PyTorch CPU kernels", str(m.get("torch_cpu_capability"))),
            ("OS", str(m.get("os"))), ("Python", str(m.get("python")))]
    versions = m.get("versions") or report.versions
    rows.append(("libraries", ", ".join(f"{k} {v}" for k, v in versions.items() if v) or "—"))
    return rows


def all_tables(report: Report) -> list[Table]:
    """Every table, in the order the Markdown and HTML reports show them."""
    from edgekd.report.stage_tables import stage_tables  # it builds on this module's formatters

    # top-down: what ships, how it compares, what each stage did, then the detailed measurements
    return [deployed_table(report), headline_table(report), ledger_table(report), *stage_tables(report),
            accuracy_table(report), latency_table(report), *filter(None, [op_profile_table(report)]),
            models_table(report), peak_table(report), stages_table(report)]
