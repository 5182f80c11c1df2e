"""The ``export`` stage: every role in every format, each verified against PyTorch before it is kept.

Files land in ``<run>/artifacts/`` as ``<role>.onnx``, ``<role>.ort`` (with
``<role>.required_operators.config``) and ``<role>.pte``. Each is loaded in its runtime and run
on real validation samples; on a parity failure the artifact is recorded as ``failed`` (so the
manifest shows it and the numbers) before ``ParityError`` is raised, and artifacts made before
it stay in place.

With more than one core, the first role is exported in a spawned child process while this one
exports the others (``export.parallel``): the exporters are mostly single-threaded Python, and
the quickstart's export took 49.7 s one role after the other against 38.5 s in parallel
(``tools/bench_export.py``). The files are the same either way.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
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


@dataclass
class RoleOutcome:
    """What exporting one role made: its artifacts in order (a failed one last) and the error that stopped it."""

    role: str
    artifacts: list[Artifact] = field(default_factory=list)
    error: EdgekdError | None = None


def export_and_verify(job: ExportJob, fmt: ExportFormat, x_val: torch.Tensor) -> Artifact:
    """Make one artifact and check it against PyTorch in its runtime.

    Raises ``ArtifactFailed`` (carrying the failed artifact, for the manifest) when the file was made but
    would not load, run or match; ``StageError`` when it could not be made at all.
    """
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
        raise ArtifactFailed(artifact, exc) from exc
    except EdgekdError as exc:  # the artifact would not load or run in its runtime
        artifact.status = "failed"
        artifact.info["error"] = exc.message
        raise ArtifactFailed(artifact, exc) from exc
    return artifact


class ArtifactFailed(Exception):
    """An artifact was written but failed its check: the manifest records it, then ``error`` is raised."""

    def __init__(self, artifact: Artifact, error: EdgekdError) -> None:
        super().__init__(error.message)
        self.artifact, self.error = artifact, error


def export_role(job: ExportJob, x_val: torch.Tensor) -> RoleOutcome:
    """Every format of one role, in order, stopping at the first failure (what came before stays)."""
    outcome = RoleOutcome(role=job.role)
    for fmt in job.config.ordered_formats():
        try:
            outcome.artifacts.append(export_and_verify(job, fmt, x_val))
        except ArtifactFailed as failed:
            outcome.artifacts.append(failed.artifact)
            outcome.error = failed.error
            break
        except EdgekdError as exc:
            outcome.error = exc
            break
    return outcome


def _export_role_in_child(job: ExportJob, x_val: torch.Tensor) -> RoleOutcome:
    # one thread: the parent process is exporting the other role on the other core(s)
    torch.set_num_threads(1)
    return export_role(job, x_val)


def _start_in_child(pool: ProcessPoolExecutor, job: ExportJob, x_val: torch.Tensor) -> Future | None:
    """Submit ``job`` to the child process; None when it cannot start (the caller exports it here)."""
    try:
        return pool.submit(_export_role_in_child, job, x_val)
    except Exception:  # noqa: BLE001 - the process could not start: export in this process instead
        return None


def _child_outcome(future: Future, job: ExportJob, x_val: torch.Tensor) -> RoleOutcome:
    try:
        return future.result()
    except EdgekdError:
        raise
    except Exception:  # noqa: BLE001 - the model would not pickle, or the child died: export it here
        return export_role(job, x_val)


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
                                   "artifacts": [], "parallel_roles": False}
        ctx.report_data["export"] = summary
        outcomes: dict[str, RoleOutcome] = {}
        with contextlib.ExitStack() as stack:
            jobs = {}
            for role in cfg.roles:
                model = stack.enter_context(eval_on_cpu(getattr(ctx, role)))  # "teacher" / "student" fields
                jobs[role] = ExportJob(role=role, model=model, example=ctx.data.example_batch(2), out_dir=out_dir,
                                       config=cfg)
            # Exporting is mostly single-threaded Python (torch.export, ExecuTorch's lowering passes), so
            # with a second core the first role (the teacher, the larger model) is exported in a child
            # process while this one exports the rest (measured: see the module docstring).
            child = None
            if cfg.parallel and len(jobs) > 1 and (os.cpu_count() or 1) > 1:
                pool = stack.enter_context(ProcessPoolExecutor(max_workers=1,
                                                               mp_context=multiprocessing.get_context("spawn")))
                child = _start_in_child(pool, jobs[cfg.roles[0]], x_val)
                summary["parallel_roles"] = child is not None
            for role, job in jobs.items():
                if child is not None and role == cfg.roles[0]:
                    continue
                outcomes[role] = export_role(job, x_val)
                if outcomes[role].error is not None:
                    break
            if child is not None:
                first = cfg.roles[0]
                outcomes[first] = _child_outcome(child, jobs[first], x_val)
        # recorded in the recipe's role order, whichever process finished first; the first role's error wins
        ordered = [outcomes[role] for role in cfg.roles if role in outcomes]
        for artifact in (a for outcome in ordered for a in outcome.artifacts):
            ctx.add_artifact(artifact)
            summary["artifacts"].append(_summary_row(artifact, ctx.run_dir.path))
        error = next((outcome.error for outcome in ordered if outcome.error is not None), None)
        if error is not None:
            raise error
