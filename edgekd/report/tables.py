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


def headline_table(report: Report) -> Table:
    t = Table("Teacher vs student", ["runtime", "threads", "batch", "model", "teacher p50 ms", "p50 ms", "speed-up",
                                     "teacher top-1", "top-1"],
              caption="measured latency on the named runtime, thread count and batch size; speed-up is the median "
                      "of per-round ratios, teacher and student timed interleaved in one process")
    for c in report.comparisons:
        t.rows.append([c.runtime, str(c.threads), str(c.batch_size), c.model, fmt_ms(c.teacher_p50_ms),
                       fmt_ms(c.p50_ms), fmt_num(c.speedup, ".2f", "x"), fmt_num(c.teacher_top1_pct, ".2f", "%"),
                       fmt_num(c.top1_pct, ".2f", "%")])
    return t


def latency_table(report: Report) -> Table:
    t = Table("Latency", ["runtime", "threads", "batch", "model", "p50 ms", "p90 ms", "p99 ms", "mean ± std ms",
                          "samples/s", "iters", "GFLOP/s", "% of GEMM peak"],
              caption="per call (one batch); samples/s = batch / mean; GFLOP/s = 2·MACs·batch / p50 "
                      "(GOP/s for INT8); peak = fastest FP32 GEMM at the same thread count")
    bench = report.benchmark
    if bench is None:
        return t
    for e in bench.timings:
        if e.latency is None:
            t.rows.append([e.runtime, str(e.threads), str(e.batch_size), e.label, "not timed: " + (e.error or "?"),
                           *[""] * 7])
            continue
        s = e.latency
        t.rows.append([e.runtime, str(e.threads), str(e.batch_size), e.label, fmt_ms(s.p50_ms), fmt_ms(s.p90_ms),
                       fmt_ms(s.p99_ms), f"{fmt_ms(s.mean_ms)} ± {fmt_ms(s.std_ms)}", f"{s.throughput_sps:,.0f}",
                       str(s.iters), fmt_num(e.gflops, ".2f"),
                       fmt_num(None if e.peak_share is None else 100 * e.peak_share, ".1f", "%")])
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
    t = Table("Machine limit (FP32 GEMM)", ["threads", "GFLOP/s", "matrix n"],
              caption="fastest n×n FP32 matrix product through torch.mm: an achievable peak, not the datasheet's")
    if report.benchmark is not None:
        for p in report.benchmark.peaks:
            t.rows.append([str(p.threads), f"{p.gflops:.1f}", str(p.size)])
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

    return [headline_table(report), accuracy_table(report), latency_table(report), models_table(report),
            peak_table(report), ledger_table(report), *stage_tables(report), stages_table(report)]
