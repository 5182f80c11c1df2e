"""The ``quantize`` stage: INT8 that is measured accurate and faster, or FP32 with the reason.

It needs the FP32 student as the target runtime runs it: the export stage's artifact when that
stage ran earlier, otherwise it exports one itself into ``artifacts/``. An INT8 artifact is
added only when the search ships one, per method (``method`` and each of ``also``, one file format each:
``student.int8.onnx``, ``student.int8.pte``); every candidate's numbers and the decision go to
``report_data["quantize"]``. On any failure the FP32 artifacts stay as they were.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import ClassVar

from edgekd.errors import RecipeError, RuntimeUnavailableError
from edgekd.fileio import atomic_path
from edgekd.models.stats import count_params_macs
from edgekd.quantize.candidates import Candidate, SearchOutcome
from edgekd.quantize.config import QUANT_METHODS, QuantizeConfig
from edgekd.quantize.methods import QuantizeJob, pte_max_batch, run_method
from edgekd.stage.base import Stage, register_stage
from edgekd.stage.context import Artifact, LedgerRow, RunContext, ValidationContext

#: validation samples the per-layer INT8 error is measured on (every tensor of both graphs is kept per batch)
LAYER_ERROR_SAMPLES = 128


def calibration_request(method: object) -> tuple[str | None, int]:
    """(recipe key under ``quantize``, number) of the training samples a method calibrates on (its registry
    entry's ``calibration_key``)."""
    return QUANT_METHODS[method.kind].calibration_samples(method)


@register_stage(QuantizeConfig)
class QuantizeStage(Stage[QuantizeConfig]):
    name: ClassVar[str] = "quantize"

    def check(self, ctx: ValidationContext) -> None:
        for where, method in self.config.keyed_methods():
            if QUANT_METHODS[method.kind].needs_executorch:
                # torch.export + the XNNPACK quantizer, which ship with executorch/torchao
                from edgekd.quantize.executorch_quant import require_executorch

                try:
                    require_executorch()
                except RuntimeUnavailableError as exc:
                    raise RecipeError(exc.message, key=f"quantize.{where}", hint=exc.hint) from exc
            # calibration draws real training samples: more than the split holds would fail only after
            # the training stages before this one had run
            key, wanted = calibration_request(method)
            if key is not None:
                key = where + key.removeprefix("method")  # also.0.samples for the first of `also`
            if key is not None and ctx.train_samples is not None and wanted > ctx.train_samples:
                raise RecipeError(f"{wanted} calibration samples asked for, but the training split holds "
                                  f"{ctx.train_samples}", key=f"quantize.{key}",
                                  hint=f"set {key} to at most {ctx.train_samples}")

    def run(self, ctx: RunContext) -> None:
        workdir = ctx.stage_dir("quantize")
        job = QuantizeJob(config=self.config, data=ctx.data, student=ctx.student, teacher=ctx.teacher,
                          workdir=workdir, fp32_onnx=lambda: self._fp32_onnx(ctx),
                          fp32_pte=lambda: self._fp32_pte(ctx, job), device=ctx.device, seed=ctx.recipe.seed,
                          resume=ctx.resume)
        # every method first, then the files: a failure in the second method leaves no INT8 file of the first
        outcomes = [(method, run_method(job, method)) for _, method in self.config.keyed_methods()]
        root = ctx.run_dir.path
        reports = []
        for method, outcome in outcomes:
            report = outcome.to_json(root)
            report["method"] = method.model_dump()
            if outcome.fmt == "onnx":
                report["layer_error"] = self._layer_error(ctx, outcome, workdir)
            if outcome.decision.ships_int8:
                report["artifact"] = str(self._ship(ctx, method.kind, outcome).path.relative_to(root))
            reports.append(report)
        # the first method's report keeps its place (report.json readers of one method see no change); the
        # others, one per format, go under "also"
        ctx.report_data["quantize"] = {**reports[0], "also": reports[1:]} if reports[1:] else reports[0]
        params, macs = count_params_macs(ctx.student, ctx.data.example_batch(1))
        (_, first), notes = outcomes[0], {}
        for _, outcome in outcomes[1:]:
            notes[outcome.fmt] = {**self._ledger_notes(outcome), "reason": outcome.decision.reason}
        ctx.ledger.append(LedgerRow(
            stage="quantize", params=params, macs=macs, val_accuracy=first.decision.shipped.accuracy,
            notes={**self._ledger_notes(first), "accuracy_on": first.runtime, "reason": first.decision.reason,
                   **notes}))

    def _layer_error(self, ctx: RunContext, outcome: SearchOutcome, workdir: Path) -> dict[str, object] | None:
        """Per-layer error (``layer_error.layer_errors``) of the shipped INT8 ONNX model, or, when FP32 stayed, of
        the most accurate INT8 candidate: the one whose loss needs explaining. A QOperator or dynamic graph cannot
        be matched tensor by tensor; its QDQ twin (the same settings in QDQ format) is read instead and named as
        such. None without any INT8 candidate."""
        import onnx

        from edgekd.quantize.layer_error import is_qdq_graph, layer_errors

        shipped = outcome.decision.shipped
        measured = [c for c in outcome.candidates if c.ok and c.path is not None]
        target = shipped if outcome.decision.ships_int8 else max(measured, key=lambda c: c.accuracy, default=None)
        if target is None or target.path is None:
            return None
        read, note = target, None
        if not is_qdq_graph(onnx.load(str(target.path), load_external_data=False)):
            read, exact = _qdq_twin(target, measured)
            if read is None:
                return {"candidate": target.name, "shipped": target is shipped,
                        "error": f"{target.name} is not a QDQ graph (its Q/DQ pairs are fused into integer "
                                 "operators) and no QDQ candidate was made to read instead; ONNX Runtime's QDQ "
                                 "debugging tools match QuantizeLinear/DequantizeLinear pairs only"}
            stand_in = ("its QDQ twin (the same settings and float nodes in QDQ format)" if exact else
                        "the most accurate QDQ candidate (no QDQ candidate shares its settings, so its errors "
                        "differ by the settings too)")
            note = (f"{target.name} is not a QDQ graph (its Q/DQ pairs are fused into integer operators); these "
                    f"are the errors of {read.name}, {stand_in}")
        # the graph the candidates were quantized from, so tensor names match (the exported file otherwise)
        prepared = workdir / "student.fp32.prep.onnx"
        fp32 = prepared if prepared.is_file() else outcome.fp32.path
        samples = min(LAYER_ERROR_SAMPLES, self.config.eval_samples or LAYER_ERROR_SAMPLES)
        x, _ = ctx.data.val_tensors(samples)
        try:
            rows = layer_errors(fp32, read.path, x.numpy(), workdir / "layer_error")
        except Exception as exc:  # a debugging view: its failure is reported, never the stage's
            return {"candidate": read.name, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
        if not rows:
            return {"candidate": read.name, "error": "no tensor of the INT8 graph matched one of the FP32 graph"}
        return {"candidate": read.name, "samples": len(x), "shipped": target is shipped,
                **({"read_for": target.name, "note": note} if note else {}), "rows": rows}

    @staticmethod
    def _ledger_notes(outcome: SearchOutcome) -> dict[str, object]:
        shipped = outcome.decision.shipped
        speedup = shipped.speedup_over(outcome.fp32)
        return {"shipped": shipped.name, "precision": shipped.precision, "runtime": outcome.runtime,
                "threads": outcome.threads, "batch_size": outcome.batch_size,
                "speedup_vs_fp32": None if speedup is None else round(speedup, 3)}

    # -- files -------------------------------------------------------------------------------
    def _ship(self, ctx: RunContext, kind: str, outcome: SearchOutcome) -> Artifact:
        shipped = outcome.decision.shipped
        assert shipped.path is not None
        target = ctx.run_dir.path / "artifacts" / f"student.int8.{outcome.fmt}"
        with atomic_path(target) as tmp:
            shutil.copyfile(shipped.path, tmp)
        speedup, drop = shipped.speedup_over(outcome.fp32), shipped.drop_from(outcome.fp32)
        artifact = Artifact(role="student", fmt=outcome.fmt, path=target, precision="int8", info={
            "method": kind, "candidate": shipped.name, "settings": shipped.settings,
            "float_nodes": shipped.excluded_nodes, "runtime": outcome.runtime, "threads": outcome.threads,
            "batch_size": outcome.batch_size, "latency_ms": shipped.latency_ms, "fp32_latency_ms": outcome.fp32.latency_ms,
            "speedup_vs_fp32": None if speedup is None else round(speedup, 3),
            "accuracy": shipped.accuracy, "fp32_accuracy": outcome.fp32.accuracy,
            "accuracy_drop": None if drop is None else round(drop, 4), "file_bytes": target.stat().st_size,
            "within_tolerance": outcome.decision.within_tolerance})
        ctx.add_artifact(artifact)
        return artifact

    def _fp32_onnx(self, ctx: RunContext) -> Path:
        existing = ctx.artifact("student", "onnx", "fp32")
        if existing is not None and existing.status == "ok" and existing.path.is_file():
            return existing.path
        from edgekd.export.onnx_export import export_onnx

        path = ctx.run_dir.path / "artifacts" / "student.onnx"
        info = export_onnx(ctx.student, ctx.data.example_batch(2), path)
        ctx.add_artifact(Artifact(role="student", fmt="onnx", path=path, precision="fp32",
                                  info={**info, "exported_by": "quantize"}))
        return path

    def _fp32_pte(self, ctx: RunContext, job: QuantizeJob) -> Path:
        existing = ctx.artifact("student", "pte", "fp32")
        if existing is not None and existing.status == "ok" and existing.path.is_file():
            return existing.path
        from edgekd.quantize.executorch_quant import lower_to_pte

        path = ctx.run_dir.path / "artifacts" / "student.pte"
        lower_to_pte(ctx.student.cpu().eval(), ctx.data.example_batch(2), path, pte_max_batch(job))
        ctx.add_artifact(Artifact(role="student", fmt="pte", path=path, precision="fp32",
                                  info={"exported_by": "quantize", "max_batch": pte_max_batch(job),
                                        "file_bytes": path.stat().st_size}))
        return path


def _qdq_twin(target: Candidate, measured: list[Candidate]) -> tuple[Candidate | None, bool]:
    """(stand-in, whether it is an exact twin): the QDQ candidate quantized like ``target`` (same settings but
    the format, same float nodes), else the most accurate QDQ candidate, else None: the graph whose per-tensor
    error stands in for a QOperator ``target``'s."""
    import onnx

    from edgekd.quantize.layer_error import is_qdq_graph

    qdq = [c for c in measured if c is not target and c.path is not None
           and is_qdq_graph(onnx.load(str(c.path), load_external_data=False))]
    same = {k: v for k, v in target.settings.items() if k != "format"}
    twins = [c for c in qdq if {k: v for k, v in c.settings.items() if k != "format"} == same
             and c.excluded_nodes == target.excluded_nodes]
    if twins:
        return twins[0], True
    return max(qdq, key=lambda c: c.accuracy or 0.0, default=None), False
