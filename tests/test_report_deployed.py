"""The report's top: one row per target runtime of what ships, rates against the peak of their own precision,
percentiles only from enough calls, .ort rows marked, the operator profile. On benchmark results shaped as
the benchmark stage writes them (the figures are given, the report's arithmetic and wording are checked)."""

from __future__ import annotations

from edgekd.bench.latency import LatencyStats
from edgekd.bench.op_profile import OpProfile, OpTime
from edgekd.bench.peak import GemmPeak
from edgekd.bench.results import BenchmarkResult, ModelEntry, TimingEntry
from edgekd.report.build import _comparisons
from edgekd.report.markdown import render_markdown
from edgekd.report.schema import Report
from edgekd.report.tables import deployed_table, latency_table, op_profile_table, peak_table


def _stats(ms: float, iters: int, batch: int) -> LatencyStats:
    return LatencyStats.from_samples([ms / 1e3] * iters, warmup=1, batch_size=batch)


FILES = {("executorch", "student"): "artifacts/student.pte", ("executorch", "student-int8"): "artifacts/student.int8.pte",
         ("executorch", "teacher"): "artifacts/teacher.pte", ("ort-mobile", "student"): "artifacts/student.ort",
         ("ort-mobile", "teacher"): "artifacts/teacher.ort"}
#: p50 ms at (runtime, label, batch); 1 thread
P50 = {("executorch", "teacher", 1): 4.0, ("executorch", "student", 1): 1.0, ("executorch", "student-int8", 1): 0.5,
       ("executorch", "teacher", 32): 64.0, ("executorch", "student", 32): 10.0, ("executorch", "student-int8", 32): 4.0,
       ("ort-mobile", "teacher", 1): 6.0, ("ort-mobile", "student", 1): 2.0, ("ort-mobile", "teacher", 32): 90.0,
       ("ort-mobile", "student", 32): 30.0}
MACS = {"teacher": 10_000_000, "student": 2_000_000}


def bench() -> BenchmarkResult:
    from edgekd.bench.accuracy import AccuracyMetrics

    models = []
    for (runtime, label), path in FILES.items():
        role, _, precision = label.partition("-")
        acc = {"teacher": 97.2, "student": 96.9, "student-int8": 96.7}[label]
        models.append(ModelEntry(runtime=runtime, label=label, role=role, precision=precision or "fp32",
                                 fmt=path.rsplit(".", 1)[1], path=path, macs=MACS[role],
                                 accuracy=AccuracyMetrics(top1_pct=acc, samples=359)))
    timings = []
    for (runtime, label, batch), ms in P50.items():
        role, _, precision = label.partition("-")
        iters = 10 if batch == 32 else 150
        gflops = 2 * MACS[role] * batch / (ms / 1e3) / 1e9
        timings.append(TimingEntry(group=runtime, runtime=runtime, threads=1, batch_size=batch, label=label, role=role,
                                   precision=precision or "fp32", latency=_stats(ms, iters, batch),
                                   speedup_vs_teacher=P50[(runtime, "teacher", batch)] / ms, gflops=gflops,
                                   peak_share=gflops / 20.0))  # as older runs stored it: against FP32
    peaks = [GemmPeak(threads=1, gflops=20.0, size=512), GemmPeak(threads=1, gflops=100.0, size=512, precision="int8")]
    profile = OpProfile(model="student", path="artifacts/student.onnx", threads=1, batch_size=32, calls=20,
                        kernel_ms_per_call=2.0, ops=[OpTime(op_type="Conv", nodes=9, ms_per_call=1.5, share=0.75),
                                                     OpTime(op_type="Add", nodes=3, ms_per_call=0.5, share=0.25)])
    return BenchmarkResult(created="now", source="run", settings={}, machine={"arch": "x86_64"}, timing_input="x",
                           peaks=peaks, models=models, timings=timings, op_profile=profile)


def report() -> Report:
    b = bench()
    return Report(generated="now", run_dir="run", name="r", machine={"arch": "x86_64"}, benchmark=b,
                  comparisons=_comparisons(b), accuracy_splits={"benchmark.accuracy": "test"})


def test_what_ships_has_one_row_per_runtime_with_the_int8_pte_where_it_shipped():
    t = deployed_table(report())
    assert t.headers == ["runtime", "file", "precision", "p50 ms, batch 1", "speed-up, batch 1", "p50 ms, batch 32",
                         "speed-up, batch 32", "top-1 (test)", "teacher top-1"]
    assert t.rows == [["executorch", "artifacts/student.int8.pte", "INT8", "0.500", "8.00x", "4.000", "16.00x",
                       "96.70%", "97.20%"],
                      ["ort-mobile (ARM-optimised, timed on x86)", "artifacts/student.ort", "FP32", "2.000", "3.00x",
                       "30.0", "3.00x", "96.90%", "97.20%"]]
    assert "optimised for ARM" in t.caption
    # an INT8 file shipped for ExecuTorch, the .ort stayed FP32: the caption says why, and how to make one
    assert "the .ort stays FP32" in t.caption and "convert_onnx_models_to_ort student.int8.onnx" in t.caption
    # a format the quantize stage kept in FP32 carries its reason, with the numbers, where the table is read
    quant = {"runtime": "onnxruntime", "shipped_precision": "fp32",
             "reason": "no INT8 candidate meets max_accuracy_drop=0 (best: x, 24.54% vs 98.88%)"}
    kept = deployed_table(report().model_copy(update={"stage_data": {"quantize": quant}}))
    assert "onnxruntime: FP32 stayed: no INT8 candidate meets max_accuracy_drop=0 (best: x, 24.54% vs 98.88%)" \
        in kept.caption


def test_rates_are_shares_of_their_own_precisions_peak_and_percentiles_need_enough_calls():
    r = report()
    rows = {(row[0], row[2], row[3]): row for row in latency_table(r).rows}
    int8 = rows[("executorch", "32", "student-int8")]
    # 2 * 2 MMACs * 32 / 4 ms = 32 GOP/s: 32% of the 100 GOP/s INT8 peak, not the 160% of the FP32 peak stored
    assert int8[10] == "32.00" and int8[11] == "32.0%"
    assert rows[("executorch", "32", "student")][11] == "64.0%"  # FP32: 12.8 GFLOP/s of the 20 GFLOP/s peak
    # 10 calls at batch 32: p90 printed, p99 not; 150 calls at batch 1: both
    assert int8[5] != "—" and int8[6] == "—" and int8[9] == "10"
    assert rows[("executorch", "1", "student-int8")][6] != "—"
    assert all(float(row[11].rstrip("%")) <= 100 for row in latency_table(r).rows)
    assert [row[0] for row in peak_table(r).rows] == ["FP32", "INT8"]


def test_markdown_leads_with_what_ships_and_one_speedup_line_and_shows_the_profile():
    md = render_markdown(report())
    assert md.index("## What ships") < md.index("## Teacher vs student") < md.index("## Latency")
    assert "## Speed-ups" not in md
    (line,) = [x for x in md.splitlines() if x.startswith("- **Deployed students**")]
    assert line.startswith("- **Deployed students** (INT8 on executorch, FP32 on ort-mobile): 3.00x (ort-mobile")
    assert "16.00x (executorch, 1t, batch 32)" in line
    profile = op_profile_table(report())
    assert profile.rows[0] == ["Conv", "9", "1.5000", "75.0%"] and "enable_profiling" in profile.caption
    assert "## Where the time goes" in md


def test_distillation_training_curves_are_a_plot_in_the_html():
    from edgekd.report.html import render_html
    from edgekd.report.plots import training_curves_plot
    from edgekd.report.schema import StageStatus

    history = [{"epoch": e, "lr": 0.01, "train_loss": 1.0 / e, "val_accuracy": 90.0 + e} for e in (1, 2, 3)]
    doc = report().model_copy(update={
        "stages": [StageStatus(index=1, key="1-distill", name="distill", status="done")],
        "stage_data": {"1-distill": {"history": history, "best_epoch": 3, "keep": "last"}}})
    plot = training_curves_plot(doc)
    assert plot is not None and plot.png.startswith(b"\x89PNG") and len(plot.png) > 5000
    assert '<img alt="Distillation training curves" src="data:image/png;base64,' in render_html(doc)
    one_epoch = doc.model_copy(update={"stage_data": {"1-distill": {"history": history[:1], "best_epoch": 1}}})
    assert training_curves_plot(one_epoch) is None  # a single point is no curve
