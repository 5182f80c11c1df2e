"""The ``benchmark`` stage: teacher against student on every runtime the recipe names.

Runs after the recipe's stages. For each runtime it takes the run's artifacts of that runtime's
format (the export and quantize stages make them: ``teacher.onnx``, ``student.ort``,
``student.int8.onnx``, ...); the torch runtime runs portable checkpoints, which this stage
writes to ``artifacts/<role>.pt`` when no stage did. Accuracy is scored on the test split (which no
decision of the run read; the gate judges these figures) against the PyTorch teacher's logits. Everything goes to ``benchmark.json`` in the run
directory, and a summary to ``report_data["benchmark"]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgekd.bench.config import BenchmarkConfig
from edgekd.bench.engine import BenchInputs, Candidate, TimingGroup, run_benchmark, unavailable_note
from edgekd.bench.op_profile import OpProfile
from edgekd.bench.results import BenchmarkResult, Note
from edgekd.fileio import atomic_write_json
from edgekd.models.evaluate import predict_logits
from edgekd.models.stats import count_params_macs
from edgekd.runtimes.registry import RUNTIMES
from edgekd.stage.base import Stage, register_stage
from edgekd.stage.context import Artifact, RunContext

BENCHMARK_FILE = "benchmark.json"
#: the data split every accuracy figure of the benchmark is measured on
ACCURACY_SPLIT = "test"
ROLES: tuple[str, ...] = ("teacher", "student")
PRECISIONS: tuple[str, ...] = ("fp32", "int8")


def _make_hint(fmt: str) -> str:
    """What to tell a user whose run lacks a runtime's file: the export stage makes every format but the
    portable checkpoint, which this stage writes itself."""
    return "the benchmark stage writes it itself" if fmt == "torch" else f"add '{fmt}' to export.formats"


def _portable_checkpoint(ctx: RunContext, role: str) -> Artifact:
    """The role's model as an edgekd portable ``.pt`` (what the torch runtime loads)."""
    from edgekd.models.portable import save_portable

    existing = ctx.artifact(role, "torch")
    if existing is not None and existing.status == "ok" and existing.path.is_file():
        return existing
    spec = ctx.recipe.teacher.spec() if role == "teacher" else ctx.recipe.student_spec()
    path = ctx.run_dir.path / "artifacts" / f"{role}.pt"
    save_portable(getattr(ctx, role), path, spec=spec, num_classes=ctx.data.num_classes,
                  input_shape=ctx.data.input_shape, extra={"role": role, "written_by": "benchmark"})
    artifact = Artifact(role=role, fmt="torch", path=path, info={"file_bytes": path.stat().st_size})
    ctx.add_artifact(artifact)
    return artifact


def _group(ctx: RunContext, runtime: str, counts: dict[str, tuple[int, int]], notes: list[Note]) -> TimingGroup:
    entry = RUNTIMES[runtime]
    fmt, suffix = entry.fmt, entry.suffix  # the file the runtime runs, as users see it (.pt, not .torch)
    candidates: list[Candidate] = []
    for role in ROLES:
        for precision in PRECISIONS:
            artifact = (_portable_checkpoint(ctx, role) if fmt == "torch" and precision == "fp32"
                        else ctx.artifact(role, fmt, precision))
            if artifact is None:
                if precision == "fp32":
                    notes.append(Note(runtime=runtime, message=f"no {role} {suffix} artifact in this run, so no "
                                                               f"{role} on {runtime} ({_make_hint(fmt)})"))
                continue
            if artifact.status != "ok" or not artifact.path.is_file():
                why = artifact.info.get("error") or ("file missing" if not artifact.path.is_file() else "failed")
                notes.append(Note(runtime=runtime, message=f"the {role} {precision} {suffix} artifact is not "
                                                           f"usable: {why}"))
                continue
            params, macs = counts[role]
            candidates.append(Candidate(runtime=runtime, role=role, precision=precision, path=artifact.path, params=params, macs=macs))
    return TimingGroup(name=runtime, candidates=candidates)


def summarize(result: BenchmarkResult) -> dict[str, Any]:
    """The compact view for ``report_data["benchmark"]`` and the manifest."""
    rows = []
    for t in result.timings:
        if t.latency is None:
            continue
        rows.append({"runtime": t.runtime, "threads": t.threads, "batch_size": t.batch_size, "model": t.label,
                     "p50_ms": round(t.latency.p50_ms, 4), "speedup_vs_teacher": t.speedup_vs_teacher})
    accuracy = [{"runtime": m.runtime, "model": m.label, "top1_pct": m.accuracy.top1_pct,
                 "agreement_pct": m.accuracy.agreement_pct} for m in result.models if m.accuracy is not None]
    return {"file": BENCHMARK_FILE, "latency_p50": rows, "accuracy": accuracy, "accuracy_split": ACCURACY_SPLIT,
            "notes": [n.message for n in result.notes]}


def _profile_deployed(groups: list[TimingGroup], cfg: BenchmarkConfig, inputs: BenchInputs,
                      result: BenchmarkResult, root: Path) -> OpProfile | None:
    """ONNX Runtime's operator profile of the student that ships for ONNX Runtime (the INT8 file when the
    quantize stage shipped one), at the benchmark's first thread count and largest batch; a note instead when
    it cannot run."""
    from edgekd.bench.op_profile import profile_onnx

    group = next((g for g in groups if g.name == "onnxruntime"), None)
    students = {c.precision: c for c in (group.candidates if group else []) if c.role == "student"}
    target = students.get("int8") or students.get("fp32")
    if target is None:
        return None
    entry = result.model("onnxruntime", target.label)
    batch = min(max(cfg.batch_sizes), (entry.max_batch if entry else None) or max(cfg.batch_sizes))
    try:
        return profile_onnx(target.path, inputs.timing_batch(batch), threads=min(cfg.threads), label=target.label,
                            shown_path=str(target.path.relative_to(root)) if target.path.is_relative_to(root)
                            else str(target.path))
    except Exception as exc:  # onnxruntime raises its own types; the benchmark itself stands
        result.notes.append(Note(runtime="onnxruntime", message=f"operator profile of {target.label} not made: "
                                                                f"{str(exc).splitlines()[0][:300]}"))
        return None


@register_stage(BenchmarkConfig)
class BenchmarkStage(Stage[BenchmarkConfig]):
    name: ClassVar[str] = "benchmark"

    def run(self, ctx: RunContext) -> None:
        cfg = self.config
        console = ctx.console
        x_test, y_test = ctx.data.test_tensors(cfg.accuracy_samples)
        example = ctx.data.example_batch(1)
        counts: dict[str, tuple[int, int]] = {}
        for role in ROLES:
            model = getattr(ctx, role)
            device = next(model.parameters()).device
            counts[role] = count_params_macs(model, example.to(device))
        reference = predict_logits(ctx.teacher, x_test).numpy()
        inputs = BenchInputs(
            x=x_test.numpy(), labels=y_test.numpy().astype(np.int64), reference_logits=reference,
            description=f"real test-split samples of {ctx.data.name} (repeated to fill a batch when fewer)",
            reference_description="the PyTorch teacher (eager, FP32) on the same samples")
        notes: list[Note] = []
        groups = []
        for runtime in cfg.runtimes:  # one group per runtime: its teacher, student and INT8 student files
            missing = unavailable_note(runtime)
            if missing is not None:
                notes.append(missing)
            else:
                groups.append(_group(ctx, runtime, counts, notes))
        result = run_benchmark(groups, cfg, inputs, source="run", root=ctx.run_dir.path, notes=notes,
                               console=console)
        result.op_profile = _profile_deployed(groups, cfg, inputs, result, ctx.run_dir.path)
        path: Path = ctx.run_dir.path / BENCHMARK_FILE
        atomic_write_json(path, result.to_json())
        ctx.stage_outputs.append(path)
        ctx.report_data["benchmark"] = summarize(result)
