"""Build the report from a run directory (``manifest.json`` + ``benchmark.json``)
and write ``report.json``, ``report.md`` and ``report.html`` next to them.

Reads only files, so ``edgekd report RUN_DIR`` renders the same report again later, and a
directory holding only a ``benchmark.json`` (from ``edgekd benchmark``) renders too.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from edgekd.bench.machine import describe_machine
from edgekd.bench.results import BenchmarkResult
from edgekd.errors import ConfigError
from edgekd.fileio import atomic_write_json, atomic_write_text
from edgekd.report.config import GateConfig
from edgekd.report.gate import evaluate_gate
from edgekd.report.schema import (
    AccuracyDrop,
    Comparison,
    GateResult,
    LedgerEntry,
    Report,
    StageStatus,
    name_of_key,
)

MANIFEST_FILE = "manifest.json"
BENCHMARK_FILE = "benchmark.json"
REPORT_FILES = {"json": "report.json", "markdown": "report.md", "html": "report.html"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", hint="the file is damaged; rerun the step that wrote it") from exc


def _gate_of_run(run_dir: Path, manifest: dict[str, Any]) -> GateConfig | None:
    """The gate the run was started with: the manifest's ``gate`` (the runner files the validated recipe's
    section there), else, for a run from before it did, ``recipe.yaml``'s. A section that does not validate
    is an error naming the file, never a report without its gate."""
    if "gate" in manifest:
        section, source = manifest["gate"], run_dir / MANIFEST_FILE
    else:
        path = run_dir / "recipe.yaml"
        try:
            section = (yaml.safe_load(path.read_text()) or {}).get("gate") if path.is_file() else None
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read the gate of {path}: {exc}".splitlines()[0],
                              hint="the file is damaged; rerun the run to write it again") from exc
        source = path
    if not section:
        return None
    try:
        return GateConfig.model_validate(section)
    except ValidationError as exc:
        raise ConfigError(f"{source}: gate: {exc.errors()[0]['msg']}",
                          hint="the run's files were edited by hand; fix the gate section or rerun") from exc


def _parity_text(artifacts: list[dict[str, Any]], role: str, precision: str) -> str | None:
    parts = []
    for a in artifacts:
        if a.get("role") != role or a.get("precision") != precision:
            continue
        parity = (a.get("info") or {}).get("parity") or {}
        if a.get("status") != "ok":
            parts.append(f"{a['fmt']} FAILED")
        elif parity.get("max_abs_diff") is not None:
            agree = parity.get("top1_agreement")
            parts.append(f"{a['fmt']} max|Δ| {parity['max_abs_diff']:.1e}"
                         + (f", top-1 agree {100 * agree:.1f}%" if agree is not None else ""))
    return "; ".join(parts) or None


def _ledger(manifest: dict[str, Any]) -> list[LedgerEntry]:
    rows = [LedgerEntry(stage=r["stage"], key=r.get("key"), params=r.get("params"), macs=r.get("macs"),
                        val_accuracy=r.get("val_accuracy"), test_accuracy=r.get("test_accuracy"),
                        notes=r.get("notes") or {})
            for r in manifest.get("ledger", [])]
    artifacts = manifest.get("artifacts", [])
    for row in rows:
        if row.stage == "quantize":
            int8 = next((a for a in artifacts if a.get("precision") == "int8" and a.get("role") == "student"), None)
            if int8 is not None:
                drop = (int8.get("info") or {}).get("accuracy_drop")
                row.parity = f"{int8['fmt']} int8 vs fp32 top-1 drop {drop:.2f} pt" if drop is not None else None
    exported = _parity_text(artifacts, "student", "fp32")
    if exported is None:
        return rows
    # The export stage adds files, not a ledger row: show their parity as a row at the export's place
    # in the run order (rows of other stages are matched to the manifest's stages by their position key,
    # or by name in runs from before rows carried one).
    ordered: list[LedgerEntry] = []
    pending = list(rows)
    for stage in manifest.get("stages", []):
        key = stage["key"]
        name = stage.get("name") or name_of_key(key)
        if name == "export":
            last = ordered[-1] if ordered else LedgerEntry(stage="teacher")
            ordered.append(LedgerEntry(stage="export", key=key, params=last.params, macs=last.macs,
                                       parity=exported,
                                       notes={"teacher_files": _parity_text(artifacts, "teacher", "fp32")}))
        while pending and (pending[0].key == key if pending[0].key is not None else pending[0].stage == name):
            ordered.append(pending.pop(0))
    return ordered + pending


def _comparisons(bench: BenchmarkResult) -> list[Comparison]:
    out = []
    for t in bench.timings:
        if t.label == "teacher" or t.latency is None:
            continue
        teacher = next((u for u in bench.timings if u.label == "teacher" and u.group == t.group
                        and u.threads == t.threads and u.batch_size == t.batch_size and u.latency), None)
        teacher_model = bench.model(teacher.runtime, "teacher") if teacher else None
        model = bench.model(t.runtime, t.label)
        out.append(Comparison(
            runtime=t.runtime, threads=t.threads, batch_size=t.batch_size, model=t.label,
            teacher_p50_ms=teacher.latency.p50_ms if teacher else None, p50_ms=t.latency.p50_ms,
            speedup=t.speedup_vs_teacher,
            teacher_top1_pct=teacher_model.accuracy.top1_pct if teacher_model and teacher_model.accuracy else None,
            top1_pct=model.accuracy.top1_pct if model and model.accuracy else None))
    return out


def _benchmark_split(manifest: dict[str, Any]) -> str | None:
    """The split the run's benchmark scored accuracy on (runs before the test split scored val); None when
    no benchmark ran."""
    bench = (manifest.get("report_data") or {}).get("benchmark")
    if not bench:
        return None
    return bench.get("accuracy_split", "val")


def _accuracy_drops(bench: BenchmarkResult | None, manifest: dict[str, Any]) -> list[AccuracyDrop]:
    drops: list[AccuracyDrop] = []
    split = _benchmark_split(manifest) or "val"
    if bench is not None:
        for m in bench.models:
            if m.role != "student" or m.accuracy is None or m.accuracy.top1_pct is None:
                continue
            teacher = bench.model(m.runtime, "teacher")
            if teacher is not None and teacher.accuracy is not None and teacher.accuracy.top1_pct is not None:
                t_acc, basis = teacher.accuracy.top1_pct, f"teacher and student both on {m.runtime}"
            elif bench.reference_top1_pct is not None:
                t_acc, basis = bench.reference_top1_pct, f"PyTorch teacher vs student on {m.runtime}"
            else:
                continue
            drops.append(AccuracyDrop(runtime=m.runtime, model=m.label, teacher_top1_pct=t_acc,
                                      top1_pct=m.accuracy.top1_pct, drop=t_acc - m.accuracy.top1_pct,
                                      samples=m.accuracy.samples, basis=basis, split=split))
    if drops:
        return drops
    # no benchmark accuracy: the ledger's PyTorch figures, test split where the run has it
    teacher = manifest.get("teacher") or {}
    key = "test_accuracy" if teacher.get("test_accuracy") is not None else "val_accuracy"
    ledger = [r for r in manifest.get("ledger", []) if r.get("stage") != "teacher" and r.get(key) is not None]
    if teacher.get(key) is not None and ledger:
        last, teacher_acc = ledger[-1], teacher[key]
        drops.append(AccuracyDrop(runtime="torch", model="student", teacher_top1_pct=teacher_acc,
                                  top1_pct=last[key], drop=teacher_acc - last[key], split=key.split("_")[0],
                                  basis=f"PyTorch accuracies from the run ledger (after {last['stage']})"))
    return drops


def _accuracy_splits(manifest: dict[str, Any]) -> dict[str, str]:
    """Where each accuracy figure of the report comes from (report.json names the split of every one)."""
    splits = {
        "ledger.val_accuracy": "val: the split every decision read (best epoch, early stopping, quantize "
                               "tolerance, prune search)",
        "ledger.test_accuracy": "test: held out from every decision",
        "teacher.val_accuracy": "val", "teacher.test_accuracy": "test",
        "gate": "test",
        "quantize.candidates": "val (the tolerance decision)",
    }
    bench = _benchmark_split(manifest)
    if bench is not None:
        splits["benchmark.accuracy"] = bench
        splits["accuracy_drops"] = f"{bench} (benchmark) or test/val as each drop's split says"
    else:  # no benchmark ran: the drops are the stages' own figures
        splits["accuracy_drops"] = "test/val as each drop's split says"
    return splits


def build_report(run_dir: Path, gate: GateConfig | None = None) -> Report:
    """The report of a run directory, with the gate's verdict in ``report.gate`` (the only place the gate is
    evaluated). ``gate``: the running recipe's gate (the runner passes it); None reads the one the run was
    started with (``_gate_of_run``). Raises ``ConfigError`` when the directory holds neither manifest nor
    benchmark, or when its files are damaged."""
    run_dir = Path(run_dir)
    manifest_path, bench_path = run_dir / MANIFEST_FILE, run_dir / BENCHMARK_FILE
    if not manifest_path.is_file() and not bench_path.is_file():
        raise ConfigError(f"{run_dir} is not an edgekd run directory: it has no {MANIFEST_FILE} or {BENCHMARK_FILE}",
                          hint="pass the folder `edgekd compress` printed (runs/<name>/<time>)")
    manifest = _read_json(manifest_path) if manifest_path.is_file() else {}
    bench = None
    if bench_path.is_file():
        try:
            bench = BenchmarkResult.model_validate(_read_json(bench_path))
        except ValidationError as exc:
            raise ConfigError(f"{bench_path} does not match the benchmark schema: {exc.errors()[0]['msg']}",
                              hint="it was written by another edgekd version; rerun the benchmark") from exc
    machine = manifest.get("machine") or (bench.machine if bench else {})
    # the benchmark's own data is the report's ``benchmark`` section; every other stage's, by position key
    stage_data = {k: v for k, v in (manifest.get("report_data") or {}).items()
                  if k != "benchmark" and not k.startswith("benchmark/")}
    report = Report(
        generated=datetime.now(timezone.utc).isoformat(timespec="seconds"), run_dir=str(run_dir),
        name=manifest.get("name") or run_dir.name, created=manifest.get("created") or (bench.created if bench else None),
        recipe_hash=manifest.get("recipe_hash"), seed=manifest.get("seed"), machine=machine,
        machine_summary=describe_machine(machine) if machine else "unknown machine",
        versions=manifest.get("versions") or machine.get("versions") or {}, data=manifest.get("data"),
        teacher=manifest.get("teacher") or {},
        stages=[StageStatus(**{k: s.get(k) for k in ("index", "key", "name", "status", "duration_s", "error")})
                for s in manifest.get("stages", [])],
        artifacts=manifest.get("artifacts", []), ledger=_ledger(manifest), benchmark=bench,
        comparisons=_comparisons(bench) if bench else [], accuracy_drops=_accuracy_drops(bench, manifest),
        accuracy_splits=_accuracy_splits(manifest), stage_data=stage_data)
    if gate is None:
        gate = _gate_of_run(run_dir, manifest)
    if gate is not None and gate.max_accuracy_drop is not None:
        failed = report.failed_stages()
        if failed:
            # a run that stopped never passes its gate: the accuracies it has are of an earlier student
            report.gate = GateResult(max_accuracy_drop=gate.max_accuracy_drop, worst=None, passed=False,
                                     message=f"the run stopped at the failed stage {failed[0].key}, so the "
                                             f"accuracy gate was not evaluated")
        else:
            report.gate = evaluate_gate(report, gate.max_accuracy_drop)
    return report


def write_all_reports(run_dir: Path, gate: GateConfig | None = None) -> Report:
    """Build the report (``build_report``: ``gate`` as there) and write ``report.json``, ``report.md`` and
    ``report.html`` into ``run_dir``."""
    from edgekd.report.html import render_html
    from edgekd.report.markdown import render_markdown

    run_dir = Path(run_dir)
    report = build_report(run_dir, gate)
    atomic_write_json(run_dir / REPORT_FILES["json"], report.to_json())
    atomic_write_text(run_dir / REPORT_FILES["markdown"], render_markdown(report))
    atomic_write_text(run_dir / REPORT_FILES["html"], render_html(report))
    return report
