"""The ``export`` stage: every role in every format, each verified against PyTorch before it is kept.

Files land in ``<run>/artifacts/`` as ``<role>.onnx``, ``<role>.ort`` (with
``<role>.required_operators.config``) and ``<role>.pte``. Each is loaded in its runtime and run
on real validation samples, then in single calls at batch 1, an odd batch and the benchmark's
batch sizes (``export.verify.batch_sizes`` + ``benchmark.batch_sizes``).

Two kinds of failure, two outcomes:

- a format the model cannot take (an operator the runtime lacks, a batch size the file refuses):
  that artifact is recorded ``failed`` with the whole cause, its file is moved out of
  ``artifacts/`` to ``stages/<i>-export/failed/`` (nothing dead ships), and the run carries on with the
  formats that passed (the benchmark skips the failed runtime and says why). Only when no artifact
  at all passed does the stage fail;
- an artifact that runs but disagrees with PyTorch beyond the tolerances: the export changed the
  model, so it is recorded ``failed`` with its numbers (the file stays for inspection) and
  ``ParityError`` stops the run; artifacts made before it stay in place.

With more than one core, the first role is exported in a spawned child process while this one
exports the others (``export.parallel``): the exporters are mostly single-threaded Python, and
the quickstart's export took 49.7 s one role after the other against 38.5 s in parallel
(``tools/bench_export.py``). The files are the same either way. The child's stdout and stderr go
to ``stages/<i>-export/parallel-child.log``; when it cannot be used (a user model that will not
import in a fresh process, a pickling error), the role is exported here and one line says why.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgekd.errors import EdgekdError, ParityError, RecipeError, StageError
from edgekd.export.config import ExportConfig, ExportFormat
from edgekd.export.formats import EXPORT_FORMATS
from edgekd.export.makers import ExportJob
from edgekd.export.parity import check_parity
from edgekd.export.prepare import eval_on_cpu, one_line, whole_cause
from edgekd.runtimes.registry import RUNTIME_FOR_FORMAT, runtime_for_format
from edgekd.stage.base import Stage, register_stage
from edgekd.stage.context import Artifact, RunContext, ValidationContext

#: where the parallel child's stdout/stderr go, inside the stage's folder
CHILD_LOG = "parallel-child.log"


#: parity numbers copied into the stage summary and the failed artifact's record
PARITY_KEYS = ("max_abs_diff", "mean_abs_diff", "max_rel_diff", "cosine_similarity", "sqnr_db", "top1_agreement")


def _summary_row(artifact: Artifact, root: Path) -> dict[str, Any]:
    info = artifact.info
    parity = info.get("parity") or {}
    row = {"role": artifact.role, "fmt": artifact.fmt, "path": str(artifact.to_json(root)["path"]),
           "status": artifact.status, "file_bytes": info.get("file_bytes"),
           **{k: parity.get(k) for k in PARITY_KEYS}, "samples": parity.get("samples"),
           "batches_checked": [b["batch"] for b in parity.get("batches", []) if "skipped" not in b]}
    entry = EXPORT_FORMATS.get(artifact.fmt)
    row.update({k: info.get(k) for k in (entry.summary_keys if entry is not None else ())})
    if artifact.fmt == "ort":
        row["mobile_recommendation"] = (info.get("mobile_usability") or {}).get("recommendation")
    if "error" in info:
        row["error"] = info["error"]
    if info.get("warnings"):
        row["warnings"] = list(info["warnings"])
    return row


@dataclass
class RoleOutcome:
    """What exporting one role made: its artifacts in order (failed ones included) and the error that
    stopped it (a disagreement with PyTorch; a format that failed does not stop the role)."""

    role: str
    artifacts: list[Artifact] = field(default_factory=list)
    error: EdgekdError | None = None


class ArtifactFailed(Exception):
    """An artifact failed. ``carry_on``: the format cannot take the model (the other formats go on);
    otherwise it disagrees with PyTorch and ``error`` stops the stage after the manifest records it."""

    def __init__(self, artifact: Artifact, error: EdgekdError, *, carry_on: bool) -> None:
        super().__init__(error.message)
        self.artifact, self.error, self.carry_on = artifact, error, carry_on


def _set_aside(job: ExportJob, artifact: Artifact) -> None:
    """Move a failed artifact's files out of ``artifacts/`` (to ``job.failed_dir``, else delete them)."""
    companions = [artifact.path, *(artifact.path.with_suffix(c) for c in EXPORT_FORMATS[artifact.fmt].companions)]
    for path in companions:
        if not path.is_file():
            continue
        if job.failed_dir is None:
            path.unlink()
            continue
        job.failed_dir.mkdir(parents=True, exist_ok=True)
        target = job.failed_dir / path.name
        shutil.move(str(path), str(target))
        if path == artifact.path:
            artifact.path = target


def _format_failed(job: ExportJob, artifact: Artifact, error: EdgekdError) -> ArtifactFailed:
    artifact.status = "failed"
    artifact.info["error"] = error.message + (f" (hint: {error.hint})" if error.hint else "")
    _set_aside(job, artifact)
    return ArtifactFailed(artifact, error, carry_on=True)


def export_and_verify(job: ExportJob, fmt: ExportFormat, x_val: torch.Tensor) -> Artifact:
    """Make one artifact and check it against PyTorch in its runtime, at every batch size it must run.

    Raises ``ArtifactFailed`` carrying the failed artifact (for the manifest): ``carry_on`` when the
    format cannot be made, loaded or run at a batch size; not when it disagrees with PyTorch.
    """
    started = time.perf_counter()
    artifact = Artifact(role=job.role, fmt=fmt, path=job.path(fmt), info={})
    try:
        artifact.info = EXPORT_FORMATS[fmt].make(job)
    except StageError as exc:
        raise _format_failed(job, artifact, StageError(f"exporting the {job.role} to {fmt}: {exc.message}",
                                                       hint=exc.hint)) from exc
    except EdgekdError:
        raise
    except Exception as exc:  # noqa: BLE001 - an exporter bug: that format fails, with its whole message
        raise _format_failed(job, artifact, StageError(f"exporting the {job.role} to {fmt} failed: "
                                                       f"{whole_cause(exc)}")) from exc
    artifact.info["export_s"] = round(time.perf_counter() - started, 2)
    verify = job.config.verify
    try:
        loaded = runtime_for_format(fmt).load(artifact.path, threads=1)
        try:
            artifact.info["parity"] = check_parity(
                job.model, loaded, x_val, atol=verify.atol, rtol=verify.rtol,
                min_top1_agreement=verify.min_top1_agreement, batch_sizes=job.batch_sizes,
                declared_max_batch=job.config.declared_max_batch(fmt),
                label=f"the {job.role}'s .{fmt} ({artifact.path.name})")
        finally:
            del loaded  # an ExecuTorch model pins its thread pool while alive
    except ParityError as exc:
        artifact.status = "failed"
        row = exc.outputs[0] if exc.outputs else {}
        artifact.info["parity"] = {"passed": False, "samples": int(len(x_val)), "atol": verify.atol,
                                   "rtol": verify.rtol, "min_top1_agreement": verify.min_top1_agreement,
                                   "outputs": exc.outputs, **{k: row.get(k) for k in PARITY_KEYS}}
        artifact.info["error"] = exc.message
        raise ArtifactFailed(artifact, exc, carry_on=False) from exc
    except EdgekdError as exc:  # the artifact would not load, or not run at a batch size it must run
        raise _format_failed(job, artifact, exc) from exc
    return artifact


def export_role(job: ExportJob, x_val: torch.Tensor) -> RoleOutcome:
    """Every format of one role, in order. A format that fails is recorded and the next one is tried;
    a disagreement with PyTorch stops the role (what came before stays)."""
    outcome = RoleOutcome(role=job.role)
    made: dict[str, Artifact] = {}
    for fmt in job.config.ordered_formats():
        source = EXPORT_FORMATS[fmt].source
        if source is not None and source in made and made[source].status != "ok":
            artifact = Artifact(role=job.role, fmt=fmt, path=job.path(fmt), status="failed",
                                info={"error": f"not made: it is converted from the {job.role}'s .{source}, "
                                               "which failed"})
            outcome.artifacts.append(artifact)
            made[fmt] = artifact
            continue
        try:
            made[fmt] = export_and_verify(job, fmt, x_val)
            outcome.artifacts.append(made[fmt])
        except ArtifactFailed as failed:
            outcome.artifacts.append(failed.artifact)
            made[fmt] = failed.artifact
            if not failed.carry_on:
                outcome.error = failed.error
                break
        except EdgekdError as exc:
            outcome.error = exc
            break
    return outcome


# -- the parallel child ----------------------------------------------------------------------
def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``).

    Elsewhere (or without libc) this does nothing: the child then ends when it next reads from
    its closed pipe."""
    import ctypes
    import ctypes.util
    import signal

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except OSError:
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _quiet_child(log_path: str, parent_pid: int) -> None:
    """Pool initializer: the child's stdout and stderr (fd 1 and 2, so native code too) go to a log
    file. A user model that fails to import in a fresh process then leaves its traceback there,
    not on the user's terminal. The child also dies with its parent (a SIGKILLed run leaves no
    export child, nor the resource tracker it keeps alive)."""
    _die_with_parent(parent_pid)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for fd in (1, 2):
        os.dup2(log, fd)
    os.close(log)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives as long as the process
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


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


def _last_line(path: Path | None) -> str | None:
    """The last non-empty line of the child's log (the exception a traceback ends with)."""
    if path is None or not path.is_file():
        return None
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else None


def _child_outcome(future: Future, job: ExportJob, x_val: torch.Tensor,
                   log: Path | None = None) -> tuple[RoleOutcome, str | None]:
    """The child's outcome, or (when the child could not be used) the role exported here and the
    one-line reason why."""
    try:
        return future.result(), None
    except EdgekdError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model would not pickle or import, or the child died
        reason = _last_line(log) or one_line(exc)
        return export_role(job, x_val), reason


def _batch_sizes(ctx: RunContext, cfg: ExportConfig) -> tuple[int, ...]:
    """The verify section's batch sizes and the benchmark's: every size an artifact will be run at."""
    bench = getattr(ctx.recipe, "benchmark", None)
    return tuple(sorted({*cfg.verify.batch_sizes, *(getattr(bench, "batch_sizes", None) or [])}))


@register_stage(ExportConfig)
class ExportStage(Stage[ExportConfig]):
    name = "export"

    def check(self, ctx: ValidationContext) -> None:
        for fmt in self.config.formats:  # each format is checked by its parity runtime, which must be here
            runtime = RUNTIME_FOR_FORMAT[fmt]
            if not runtime.available():
                raise RecipeError(f"'{fmt}' needs {runtime.summary} ({runtime.package}), which is not installed",
                                  key="formats", hint=f"{runtime.install}, or drop {fmt} from export.formats")

    def run(self, ctx: RunContext) -> None:
        cfg = self.config
        console = ctx.console  # quiet=True in the Python API silences the whole run
        out_dir = ctx.run_dir.path / "artifacts"
        out_dir.mkdir(parents=True, exist_ok=True)
        stage_dir = ctx.stage_dir("export")  # stages/<i>-export/: two export stages keep their own files
        samples = min(cfg.verify.samples, len(ctx.data.val))
        x_val, _ = ctx.data.val_tensors(samples)
        batch_sizes = _batch_sizes(ctx, cfg)
        summary: dict[str, Any] = {"settings": cfg.model_dump(mode="json"), "parity_samples": samples,
                                   "parity_batch_sizes": list(batch_sizes), "artifacts": [], "failed": [],
                                   "warnings": [], "parallel_roles": False}
        ctx.report_data["export"] = summary
        outcomes: dict[str, RoleOutcome] = {}
        with contextlib.ExitStack() as stack:
            jobs = {}
            for role in cfg.roles:
                model = stack.enter_context(eval_on_cpu(getattr(ctx, role)))  # "teacher" / "student" fields
                jobs[role] = ExportJob(role=role, model=model, example=ctx.data.example_batch(2), out_dir=out_dir,
                                       config=cfg, batch_sizes=batch_sizes, failed_dir=stage_dir / "failed")
            # Exporting is mostly single-threaded Python (torch.export, ExecuTorch's lowering passes), so
            # with a second core the first role (the teacher, the larger model) is exported in a child
            # process while this one exports the rest (measured: see the module docstring).
            child, child_log = None, None
            if cfg.parallel and len(jobs) > 1 and (os.cpu_count() or 1) > 1:
                stage_dir.mkdir(parents=True, exist_ok=True)
                child_log = stage_dir / CHILD_LOG
                pool = stack.enter_context(ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_quiet_child, initargs=(str(child_log), os.getpid())))
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
                outcomes[first], reason = _child_outcome(child, jobs[first], x_val, child_log)
                if reason is not None:
                    summary["parallel_roles"] = False
                    summary["parallel_fallback"] = reason
                    console.print(f"  [yellow]export:[/] the {first} was exported in this process (the parallel "
                                  f"export process could not be used: {reason})", highlight=False, soft_wrap=True)
        # recorded in the recipe's role order, whichever process finished first; the first role's error wins
        ordered = [outcomes[role] for role in cfg.roles if role in outcomes]
        for artifact in (a for outcome in ordered for a in outcome.artifacts):
            ctx.add_artifact(artifact)
            summary["artifacts"].append(_summary_row(artifact, ctx.run_dir.path))
            if artifact.status != "ok":
                summary["failed"].append({"role": artifact.role, "fmt": artifact.fmt,
                                          "error": artifact.info.get("error")})
            for warning in artifact.info.get("warnings") or []:
                summary["warnings"].append(f"{artifact.role} .{artifact.fmt}: {warning}")
                console.print(f"  [yellow]warning:[/] the {artifact.role}'s .{artifact.fmt}: {warning}",
                              highlight=False, soft_wrap=True)
        error = next((outcome.error for outcome in ordered if outcome.error is not None), None)
        if error is not None:
            raise error
        printed: dict[tuple[str, str], str] = {}  # (fmt, cause with the role blanked) -> the role printed
        for failed in summary["failed"]:
            role, fmt, cause = failed["role"], failed["fmt"], failed["error"] or ""
            same = printed.get((fmt, cause.replace(role, "<role>")))
            why = f"for the same reason as the {same}'s" if same else f"(the other formats carry on): {cause}"
            console.print(f"  [yellow]warning:[/] the {role}'s .{fmt} failed and is not shipped {why}",
                          highlight=False, soft_wrap=True)
            printed.setdefault((fmt, cause.replace(role, "<role>")), role)
        if not any(a.status == "ok" for outcome in ordered for a in outcome.artifacts):
            raise StageError("no artifact could be exported:\n  " + "\n  ".join(
                f"{f['role']} .{f['fmt']}: {f['error']}" for f in summary["failed"]),
                hint="fix the first cause above, or choose other export.formats")
