"""The ``export`` stage: every role in every format, each verified against PyTorch before it is kept.

Files land in ``<run>/artifacts/`` as ``<role>.onnx``, ``<role>.ort`` (with
``<role>.required_operators.config``) and ``<role>.pte``. Each is loaded in its runtime and run
on real validation samples; on a parity failure the artifact is recorded as ``failed`` (so the
manifest shows it and the numbers) before ``ParityError`` is raised, and artifacts made before
it stay in place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekd.errors import EdgekdError, ParityError, RecipeError, StageError
from edgekd.export.config import ExportConfig, ExportFormat
from edgekd.export.executorch_export import export_pte
from edgekd.export.onnx_export import export_onnx
from edgekd.export.ort_format import convert_to_ort, mobile_usability
from edgekd.export.parity import check_parity
from edgekd.export.prepare import eval_on_cpu, one_line
from edgekd.pipeline.context import Artifact, RunContext, ValidationContext
from edgekd.pipeline.stage import Stage, register_stage
from edgekd.runtimes.executorch_xnnpack import ExecuTorchRuntime
from edgekd.runtimes.registry import runtime_for_format

EXTENSIONS: dict[str, str] = {"onnx": ".onnx", "ort": ".ort", "pte": ".pte"}


@dataclass
class ExportJob:
    """One role's model (CPU, eval mode) and where its files go."""

    role: str
    model: nn.Module
    example: torch.Tensor
    out_dir: Path
    config: ExportConfig

    def path(self, fmt: str) -> Path:
        return self.out_dir / f"{self.role}{EXTENSIONS[fmt]}"


def _make_onnx(job: ExportJob) -> dict[str, Any]:
    cfg = job.config
    return export_onnx(job.model, job.example, job.path("onnx"), opset=cfg.opset,
                       dynamic_batch=cfg.dynamic_batch, simplify=cfg.simplify)


def _make_ort(job: ExportJob) -> dict[str, Any]:
    source = job.path("onnx")  # ExportConfig guarantees onnx is made first
    info = convert_to_ort(source, job.path("ort"), target_platform=job.config.ort_target_platform)
    info["source"] = source.name
    info["mobile_usability"] = mobile_usability(source)
    return info


def _make_pte(job: ExportJob) -> dict[str, Any]:
    return export_pte(job.model, job.example, job.path("pte"), dynamic_batch=job.config.dynamic_batch,
                      max_batch=job.config.pte_max_batch)


#: how each format is made (dispatch on the recipe's Literal value)
EXPORTERS: dict[str, Callable[[ExportJob], dict[str, Any]]] = {"onnx": _make_onnx, "ort": _make_ort, "pte": _make_pte}


def _summary_row(artifact: Artifact, root: Path) -> dict[str, Any]:
    info = artifact.info
    parity = info.get("parity") or {}
    row = {"role": artifact.role, "fmt": artifact.fmt, "path": str(artifact.to_json(root)["path"]),
           "status": artifact.status, "file_bytes": info.get("file_bytes"),
           "max_abs_diff": parity.get("max_abs_diff"), "mean_abs_diff": parity.get("mean_abs_diff"),
           "top1_agreement": parity.get("top1_agreement"), "samples": parity.get("samples")}
    extra_keys = {"onnx": ("exporter", "opset", "nodes", "batchnorm_nodes"),
                  "ort": ("target_platform",), "pte": ("delegated_nodes", "non_delegated_nodes", "max_batch")}
    row.update({k: info.get(k) for k in extra_keys.get(artifact.fmt, ())})
    if artifact.fmt == "ort":
        row["mobile_recommendation"] = (info.get("mobile_usability") or {}).get("recommendation")
    if "error" in info:
        row["error"] = info["error"]
    return row


@register_stage(ExportConfig)
class ExportStage(Stage[ExportConfig]):
    name = "export"

    def check(self, ctx: ValidationContext) -> None:
        if "pte" in self.config.formats and not ExecuTorchRuntime.available():
            raise RecipeError("'pte' needs ExecuTorch, which is not installed", key="formats",
                              hint="pip install 'edgekd[mobile]', or drop pte from export.formats")

    def run(self, ctx: RunContext) -> None:
        cfg = self.config
        out_dir = ctx.run_dir.path / "artifacts"
        out_dir.mkdir(parents=True, exist_ok=True)
        samples = min(cfg.verify.samples, len(ctx.data.val))
        x_val, _ = ctx.data.val_tensors(samples)
        summary: dict[str, Any] = {"settings": cfg.model_dump(mode="json"), "parity_samples": samples,
                                   "artifacts": []}
        ctx.report_data["export"] = summary
        for role in cfg.roles:
            module: nn.Module = getattr(ctx, role)  # "teacher" / "student" are RunContext fields
            with eval_on_cpu(module) as model:
                job = ExportJob(role=role, model=model, example=ctx.data.example_batch(2), out_dir=out_dir,
                                config=cfg)
                for fmt in cfg.ordered_formats():
                    artifact = self._export_and_verify(job, fmt, x_val, ctx, summary)
                    summary["artifacts"].append(_summary_row(artifact, ctx.run_dir.path))

    def _export_and_verify(self, job: ExportJob, fmt: ExportFormat, x_val: torch.Tensor, ctx: RunContext,
                           summary: dict[str, Any]) -> Artifact:
        started = time.perf_counter()
        try:
            info = EXPORTERS[fmt](job)
        except StageError as exc:
            raise StageError(f"exporting the {job.role} to {fmt}: {exc.message}", hint=exc.hint) from exc
        except EdgekdError:
            raise
        except Exception as exc:  # an exporter bug surfaces as a stage failure with its first line
            raise StageError(f"exporting the {job.role} to {fmt} failed: {one_line(exc)}",
                             hint="rerun with --debug for the traceback") from exc
        info["export_s"] = round(time.perf_counter() - started, 2)
        artifact = Artifact(role=job.role, fmt=fmt, path=job.path(fmt), info=info)
        verify = job.config.verify
        try:
            loaded = runtime_for_format(fmt).load(artifact.path, threads=1)
            try:
                artifact.info["parity"] = check_parity(
                    job.model, loaded, x_val, atol=verify.atol, min_top1_agreement=verify.min_top1_agreement,
                    label=f"the {job.role}'s .{fmt} ({artifact.path.name})")
            finally:
                del loaded  # an ExecuTorch model pins its thread pool while alive
        except ParityError as exc:
            artifact.status = "failed"
            row = exc.outputs[0] if exc.outputs else {}
            artifact.info["parity"] = {"passed": False, "samples": int(len(x_val)), "atol": verify.atol,
                                       "min_top1_agreement": verify.min_top1_agreement, "outputs": exc.outputs,
                                       **{k: row.get(k) for k in ("max_abs_diff", "mean_abs_diff", "top1_agreement")}}
            self._record(artifact, ctx, summary)
            raise
        except EdgekdError as exc:  # the artifact would not load or run in its runtime
            artifact.status = "failed"
            artifact.info["error"] = exc.message
            self._record(artifact, ctx, summary)
            raise
        ctx.add_artifact(artifact)
        return artifact

    @staticmethod
    def _record(artifact: Artifact, ctx: RunContext, summary: dict[str, Any]) -> None:
        ctx.add_artifact(artifact)
        summary["artifacts"].append(_summary_row(artifact, ctx.run_dir.path))
