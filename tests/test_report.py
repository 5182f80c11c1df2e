"""The benchmark stage inside a real run, the report files it leads to, the summary and the gate.

One real `edgekd compress` run (digits 8x8, an MLP teacher, a tiny distilled MLP student,
ONNX + ORT exports, benchmark on every runtime) feeds every test here; its gate is set so the
tiny student fails it, so the run must exit with code 3 after writing all reports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from edgekd.errors import GateFailedError
from edgekd.report.build import build_report
from edgekd.report.config import GateConfig
from edgekd.report.schema import REPORT_SCHEMA_VERSION, Report

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """
name: bench-report
seed: 0
data: {dataset: digits, image_size: 8, batch_size: 64, val_fraction: 0.15, test_fraction: 0.2}
teacher: {model: mlp, kwargs: {hidden: 64}, train: {epochs: 3}}
student: {model: mlp, kwargs: {hidden: 4, depth: 1}}
stages:
  - distill: {epochs: 1}
  - export: {formats: [onnx, ort], verify: {samples: 64}}
benchmark:
  runtimes: [torch, onnxruntime, ort-mobile, executorch]
  threads: [1]
  batch_sizes: [1, 16]
  warmup: 2
  min_time_s: 0.02
  min_iters: 5
  memory: false
  peak: true
gate: {max_accuracy_drop: 0.0}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("report")
    (work / "recipe.yaml").write_text(RECIPE)
    out = work / "run"
    proc = subprocess.run([sys.executable, "-m", "edgekd", "compress", "recipe.yaml", "--out", str(out)],
                          cwd=work, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "160"})
    return proc, out


def test_failed_gate_exits_3_after_writing_every_report(run):
    proc, out = run
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "accuracy gate failed" in proc.stderr
    for name in ("benchmark.json", "report.json", "report.md", "report.html"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["done"] * 4 and manifest["stages"][-1]["key"] == "benchmark"
    assert "benchmark.json" in manifest["stages"][-1]["outputs"]
    assert manifest["report_data"]["benchmark"]["file"] == "benchmark.json"
    # the end-of-run summary was printed: teacher vs student per runtime, and the gate's verdict
    assert "Teacher vs student" in proc.stdout and "gate FAILED" in proc.stdout


def test_report_json_holds_the_benchmark_of_every_installed_runtime(run):
    _, out = run
    report = Report.model_validate_json((out / "report.json").read_text())
    assert report.schema_version == REPORT_SCHEMA_VERSION and report.name == "bench-report"
    bench = report.benchmark
    assert bench is not None and bench.source == "run"
    assert {(m.runtime, m.label) for m in bench.models} == {
        (rt, role) for rt in ("torch", "onnxruntime", "ort-mobile") for role in ("teacher", "student")}
    # no .pte was exported: executorch is reported as missing its artifacts, not a crash
    assert any(n.runtime == "executorch" and ".pte" in n.message for n in bench.notes)
    assert len(report.comparisons) == 3 * 2
    for c in report.comparisons:
        assert c.teacher_p50_ms > 0 and c.p50_ms > 0 and c.speedup > 0
        assert c.setting.startswith(f"measured latency on {c.runtime}, 1 thread, batch ")
    teacher_acc = report.teacher["test_accuracy"]
    for m in bench.models:  # every runtime scored both models on the whole test split
        assert m.accuracy.samples == report.data["test_samples"] != report.data["val_samples"]
        if m.role == "teacher":  # exported teachers agree with the PyTorch teacher
            assert m.accuracy.top1_pct == pytest.approx(teacher_acc, abs=0.5) and m.accuracy.agreement_pct > 99
        assert m.file_bytes > 0 and m.params > 0 and m.macs > 0
    assert {t.threads for t in bench.timings if t.gflops} == {1} and bench.peaks[0].gflops > 0
    assert report.machine["isa"] and report.machine_summary
    assert report.gate is not None and not report.gate.passed and report.gate.worst.drop > 0
    assert report.gate.worst.split == "test" and "on the test split" in report.gate.message
    assert report.accuracy_splits["benchmark.accuracy"] == "test" and report.accuracy_splits["gate"] == "test"
    assert all(d.split == "test" for d in report.accuracy_drops)
    stages = [row.stage for row in report.ledger]
    assert stages == ["teacher", "distill", "export"] and "onnx max|Δ|" in report.ledger[-1].parity
    # every PyTorch ledger row carries both splits; the teacher's test figure is the benchmark's
    assert all(row.val_accuracy is not None and row.test_accuracy is not None for row in report.ledger[:2])
    assert report.ledger[0].test_accuracy == pytest.approx(teacher_acc)
    assert (out / "artifacts" / "student.pt").is_file()  # the torch runtime's portable checkpoint


def test_markdown_and_html_render_with_plots(run):
    _, out = run
    md = (out / "report.md").read_text()
    for heading in ("## What ships: the deployed student per runtime", "## Teacher vs student",
                    "## Accuracy on each runtime", "## Latency", "## Size and memory",
                    "## Machine limit (GEMM peak per precision)", "## Stage ledger", "## Machine"):
        assert heading in md, heading
    # top-down: what ships first, then the comparison, what the stages did, the detailed measurements last
    order = [md.index(h) for h in ("## What ships", "## Teacher vs student", "## Stage ledger",
                                   "## Distillation epochs", "## Latency", "## Machine limit")]
    assert order == sorted(order)
    assert "Gate FAILED" in md and "## Speed-ups" not in md  # one summary line, not a list repeating the table
    # no quantize stage: the FP32 student ships on every runtime, one row each; the summary is one line
    assert "| onnxruntime | artifacts/student.onnx | FP32 |" in md and "| torch | artifacts/student.pt | FP32 |" in md
    assert re.search(r"- \*\*Deployed students\*\* \(FP32 on [a-z, -]+\): [0-9.]+x \(\S+, 1t, batch \d+\) to [0-9.]+x", md)
    # .ort files are optimised for ARM: their rows say so on this x86 machine
    assert "| ort-mobile (ARM-optimised, timed on x86) |" in md and "optimised for ARM" in md
    # a percentile only from enough timed calls (p99: 100), else "—"; the iterations of every cell are printed
    latency = md[md.index("## Latency"):].split("\n## ")[0]
    rows = [row.split(" | ") for row in latency.splitlines() if row.startswith("| ") and "not timed" not in row]
    assert rows[0][9] == "iters" and len(rows) > 1
    assert all((row[6] == "—") == (int(row[9]) < 100) and (row[5] == "—") == (int(row[9]) < 10) for row in rows[1:])
    # where the deployed ONNX student's time goes: ONNX Runtime's profiler, per operator type
    assert "## Where the time goes: operator profile of the deployed student (onnxruntime)" in md
    assert re.search(r"\| Gemm \| \d+ \| [0-9.]+ \| [0-9.]+% \|", md)
    html = (out / "report.html").read_text()
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 3 and all(len(i) > 1000 for i in images)  # latency, Pareto, ledger
    assert "http://" not in html and "https://" not in html  # self-contained: nothing to fetch
    assert html.count("<table>") >= 9 and "Pareto" in html
    # the HTML reads top-down too: what ships before any plot, each plot under the table whose numbers it draws
    first_plot = html.index("<figure>")
    assert html.index("What ships") < html.index("<h2>Teacher vs student") < first_plot
    assert html.index("<h2>Stage ledger") < html.index('alt="Stage ledger"') < html.index("<h2>Latency")
    # what the stages decided reaches the report, not only report.json: each distillation epoch
    # and each exported file with its parity figures
    assert "## Distillation epochs" in md and re.search(r"\| 1 \| [0-9.e-]+ \| \d+\.\d{4} \| \d+\.\d\d% \|", md)
    assert "(rule: best val accuracy, on val)" in md  # an MLP student starts from random weights: the best epoch
    assert "## Exported files" in md and "| student | onnx | artifacts/student.onnx | ok |" in md


def test_html_report_renders_in_a_headless_browser_with_every_plot(run):
    """report.html opened in a real browser (Debian's chromium, driven by selenium): every plot decodes
    and is drawn, the tables are there, and nothing is fetched from outside the file. ``.ci/run`` installs
    chromium and chromium-driver; where they are missing this test is skipped, saying so."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no chromium/chromedriver here (apt-get install chromium chromium-driver; .ci/run does)")
    from selenium import webdriver

    _, out = run
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    try:
        browser.get((out / "report.html").resolve().as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight,"
            " i.getBoundingClientRect().width])")
        assert len(images) == 3, images  # latency, Pareto, ledger
        for alt, complete, width, height, shown_width in images:
            assert complete and width > 100 and height > 100 and shown_width > 100, (alt, width, height, shown_width)
        assert browser.execute_script("return document.querySelectorAll('table').length") >= 9
        assert "What ships" in browser.execute_script("return document.body.innerText")
        fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert all(name.startswith("data:") for name in fetched), fetched  # self-contained
    finally:
        browser.quit()


def test_report_command_renders_again_from_the_files(run, tmp_path):
    import shutil

    from edgekd.commands.report import render_report
    from edgekd.report.summary import print_summary

    _, out = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for name in ("report.json", "report.md", "report.html"):
        (copy / name).unlink()
    report = render_report(copy)
    assert all((copy / n).is_file() for n in ("report.json", "report.md", "report.html"))
    assert report.comparisons == Report.model_validate_json((out / "report.json").read_text()).comparisons
    console = Console(record=True, width=120)
    print_summary(report, console)
    text = console.export_text()
    assert "onnxruntime" in text and "gate FAILED" in text and "executorch" in text


def test_gate_passes_or_raises_exit_code_3(run):
    _, out = run
    worst = build_report(out).worst_drop()
    from edgekd.report.gate import raise_for_gate

    # the report carries the one verdict (build_report evaluates the gate it is given, or the run's own);
    # raise_for_gate only reads it
    assert build_report(out, GateConfig()).gate is None and raise_for_gate(build_report(out, GateConfig())) is None
    assert build_report(out).gate.max_accuracy_drop == 0.0  # the run's own gate, from its manifest
    assert raise_for_gate(build_report(out, GateConfig(max_accuracy_drop=min(100.0, worst.drop + 0.5)))).passed
    with pytest.raises(GateFailedError) as info:
        raise_for_gate(build_report(out, GateConfig(max_accuracy_drop=max(0.0, worst.drop - 0.5))))
    assert info.value.exit_code == 3 and "accuracy gate failed" in str(info.value)


def test_gate_reads_only_the_test_split():
    from edgekd.report.gate import evaluate_gate
    from edgekd.report.schema import AccuracyDrop

    def drop(split: str, student: float) -> AccuracyDrop:
        return AccuracyDrop(runtime="torch", model="student", teacher_top1_pct=98.0, top1_pct=student,
                            drop=98.0 - student, basis="test", split=split)

    val_only = Report(generated="now", run_dir="run", name="r", accuracy_drops=[drop("val", 97.9)])
    verdict = evaluate_gate(val_only, 1.0)
    assert not verdict.passed and "test split" in verdict.message  # a val figure never passes the gate
    # a small drop on val does not hide a large one on test
    both = Report(generated="now", run_dir="run", name="r", accuracy_drops=[drop("val", 97.9), drop("test", 96.0)])
    verdict = evaluate_gate(both, 1.0)
    assert not verdict.passed and verdict.worst.split == "test" and verdict.worst.drop == pytest.approx(2.0)
    # the limit carries its unit and the key that sets it
    assert "beyond the gate's 1 point (gate.max_accuracy_drop)" in verdict.message
    assert "within the gate's 2.5 points" in evaluate_gate(both, 2.5).message


def test_report_notes_an_int8_student_slower_than_fp32_at_a_batch_size_the_decision_did_not_time():
    from edgekd.report.markdown import render_markdown, slower_int8_lines
    from edgekd.report.schema import Comparison

    def row(model: str, batch: int, ms: float) -> Comparison:
        return Comparison(runtime="onnxruntime", threads=1, batch_size=batch, model=model, teacher_p50_ms=10.0,
                          p50_ms=ms, speedup=10.0 / ms)

    quant = {"runtime": "onnxruntime", "batch_size": 32, "also": [{"runtime": "executorch", "batch_size": 8}]}
    report = Report(generated="now", run_dir="run", name="r", stage_data={"quantize": quant},
                    comparisons=[row("student", 1, 0.20), row("student-int8", 1, 0.25),  # slower at batch 1
                                 row("student", 32, 4.0), row("student-int8", 32, 1.5)])
    (line,) = slower_int8_lines(report)
    assert "onnxruntime" in line and "1t batch 1: 0.250 vs 0.200 ms" in line and "batch 32" not in line.split(";")[0]
    assert "chose it at batch 32 (quantize.speed.batch_size)" in line and line in render_markdown(report)
    faster = report.model_copy(update={"comparisons": [row("student", 1, 0.20), row("student-int8", 1, 0.10)]})
    assert slower_int8_lines(faster) == []


def test_deployed_student_is_the_shipped_int8_file_when_quantize_shipped_one():
    from edgekd.report.markdown import deployed_lines
    from edgekd.report.schema import Comparison

    artifacts = [{"role": "student", "fmt": "onnx", "path": "artifacts/student.onnx", "precision": "fp32",
                  "status": "ok"},
                 {"role": "student", "fmt": "onnx", "path": "artifacts/student.int8.onnx", "precision": "int8",
                  "status": "ok"}]
    comparisons = [Comparison(runtime=r, threads=1, batch_size=b, model=m, teacher_p50_ms=10.0,
                              p50_ms=10.0 / x, speedup=x, teacher_top1_pct=99.0, top1_pct=98.5)
                   for r, m, b, x in (("onnxruntime", "student", 1, 3.0), ("onnxruntime", "student-int8", 1, 5.0),
                                      ("onnxruntime", "student-int8", 32, 7.25), ("torch", "student", 1, 2.5))]
    report = Report(generated="now", run_dir="run", name="r", artifacts=artifacts, comparisons=comparisons)
    assert report.deployed_student() == ("student-int8", "artifacts/student.int8.onnx")
    (line,) = deployed_lines(report)
    # the FP32 student of onnxruntime (3.00x) is not what ships there; torch runs the FP32 one
    assert "3.00x" not in line and "(INT8 on onnxruntime, FP32 on torch)" in line
    assert "2.50x (torch, 1t, batch 1) to 7.25x (onnxruntime, 1t, batch 32)" in line
    failed = [dict(a, status="failed") if a["precision"] == "int8" else a for a in artifacts]
    assert Report(generated="now", run_dir="run", name="r", artifacts=failed).deployed_student() == (
        "student", "artifacts/student.onnx")



def test_a_run_without_a_benchmark_names_the_gate_split_and_the_teachers_rollbacks(tmp_path):
    """No benchmark section: the splits say the gate is on test and name no benchmark split (it used to say
    "benchmark and gate on val"); a teacher whose lr is far too high is rolled back by the guard, and the
    report says so (report.json's teacher and a summary line), as it does for a stage's training."""
    import edgekd

    recipe = {"name": "no-bench", "seed": 0, "data": {"dataset": "digits", "image_size": 8, "batch_size": 64},
              "teacher": {"model": "mlp", "kwargs": {"hidden": 64},
                          "train": {"epochs": 3, "lr": 10.0, "warmup_epochs": 0, "schedule": "constant"}},
              "stages": [{"finetune": {"epochs": 1}}], "gate": {"max_accuracy_drop": 100.0}}
    result = edgekd.compress(recipe, out=tmp_path / "run", quiet=True)
    report = json.loads((result.run_dir / "report.json").read_text())
    assert "benchmark.accuracy" not in report["accuracy_splits"] and report["accuracy_splits"]["gate"] == "test"
    markdown = result.report_files["markdown"].read_text()
    assert "Accuracy splits: gate on test (no benchmark ran)" in markdown and "on val (held out" not in markdown
    events = report["teacher"]["guard_events"]
    assert events and events[0]["action"] == "rollback" and events[0]["peak_lr"] < 10.0
    assert "Teacher training: the divergence guard acted" in markdown
