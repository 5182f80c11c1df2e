"""Run a recipe: teacher → student → stages in order → benchmark → report with the gate's verdict.

After each step the manifest records its status, duration and output hashes, and the student
is saved in the portable format, so ``--resume`` restarts after the last finished step and a
failing step leaves everything before it in place, with the report of the finished steps (the failed
one and its error at its top; a run that stopped never passes its gate).

Each step is known by its position key: "teacher", "<i>-<name>" for the i-th entry of
``recipe.stages`` ("0-prune", "3-distill") and "benchmark". A stage works in ``stages/<key>/``
and what it files in ``ctx.report_data`` is kept in the manifest's ``report_data`` under its key
(see ``RunContext.stage_report_entries``), so a recipe that prunes and distills twice keeps both
prunes' files, report data and ledger rows, and a resumed second distill continues its own
checkpoint, never the first's.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console

import edgekd.pipeline.stages  # noqa: F401  (registers every stage)
from edgekd.data import load_data
from edgekd.errors import ConfigError, EdgekdError, StageError
from edgekd.fileio import atomic_write_text, sha256_file, stale_temporaries
from edgekd.models.evaluate import top1_accuracy
from edgekd.models.portable import load_portable, save_portable, trusted_factories
from edgekd.models.spec import ModelSpec
from edgekd.models.stats import count_params_macs
from edgekd.pipeline.rundir import MANIFEST_SCHEMA, RunDir, now_iso
from edgekd.pipeline.teacher import prepare_teacher
from edgekd.recipe.load import recipe_hash
from edgekd.recipe.schema import Recipe
from edgekd.stage.base import Stage, stage_for
from edgekd.stage.context import Artifact, LedgerRow, RunContext
from edgekd.train.guard import at_chance
from edgekd.versions import library_versions


@dataclass
class RunResult:
    """What a run produced: its folder, its manifest and its report (``edgekd.report.schema.Report``:
    ledger, artifacts, benchmark, accuracy drops, and the gate's verdict in ``report.gate``). ``report`` is
    None only on the non-main ranks of a torchrun run, which write no report."""

    run_dir: Path
    manifest: dict[str, Any]
    report: Any = None

    @property
    def gate(self) -> Any:
        """The gate's verdict (``GateResult``: ``passed``, ``message``, the ``worst`` drop), None without a gate."""
        return self.report.gate if self.report is not None else None

    @property
    def passed(self) -> bool:
        """False only when the recipe has a gate and the student failed it."""
        return self.gate is None or bool(self.gate.passed)

    @property
    def report_files(self) -> dict[str, Path]:
        """``{"json"|"markdown"|"html": path}`` of the report files the run wrote."""
        from edgekd.report.build import REPORT_FILES

        return {kind: self.run_dir / name for kind, name in REPORT_FILES.items() if (self.run_dir / name).is_file()}

    @property
    def student(self) -> Path | None:
        """The portable checkpoint of the final student (``student/after-<last step>.pt``), if any."""
        done = [s["key"] for s in self.manifest.get("stages", [])[1:] if s.get("status") == "done"]
        for key in reversed(done):
            path = self.run_dir / "student" / f"after-{key}.pt"
            if path.is_file():
                return path
        return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def planned_steps(recipe: Recipe) -> list[tuple[str, Stage | None]]:
    """(key, stage) in run order; the teacher step has no Stage object."""
    steps: list[tuple[str, Stage | None]] = [("teacher", None)]
    for i, entry in enumerate(recipe.stages):
        steps.append((f"{i}-{entry.key}", stage_for(entry.config)))
    if recipe.benchmark is not None:
        steps.append(("benchmark", stage_for(recipe.benchmark)))
    return steps


def _new_manifest(recipe: Recipe, steps: list[tuple[str, Stage | None]]) -> dict[str, Any]:
    from edgekd.bench.machine import machine_facts

    machine = machine_facts()
    versions = machine.pop("versions", None) or library_versions()  # kept once, at the top level
    return {
        "schema": MANIFEST_SCHEMA,
        "name": recipe.name,
        "recipe_hash": recipe_hash(recipe),
        "seed": recipe.seed,
        "created": now_iso(),
        "versions": versions,
        "machine": machine,
        "stages": [{"index": i, "key": key, "name": _step_name(stage), "status": "pending", "started": None,
                    "duration_s": None, "error": None, "outputs": {}} for i, (key, stage) in enumerate(steps)],
        "artifacts": [],
        "ledger": [],
        #: each step's report data by position key ("0-prune", "0-prune/<other name>", "benchmark")
        "report_data": {},
        "teacher": {},
        #: the validated recipe's gate section; the report reads it when it is rendered again
        "gate": recipe.gate.model_dump(mode="json") if recipe.gate is not None else None,
    }


def _step_name(stage: Stage | None) -> str:
    """The stage's name ("prune") for the manifest, so readers need not parse it out of the key."""
    return "teacher" if stage is None else stage.name


def _migrate_report_data(manifest: dict[str, Any]) -> None:
    """A manifest written before report data was keyed by position holds it by stage name ("prune"):
    file each such entry under the position of the one finished stage of that name (resuming it)."""
    data = manifest["report_data"]
    keys = {s["key"] for s in manifest["stages"]}
    for name in [k for k in data if k not in keys and "/" not in k]:
        done = [s["key"] for s in manifest["stages"]
                if s["status"] == "done" and s.get("name", s["key"].split("-", 1)[-1]) == name]
        if len(done) == 1 and done[0] not in data:
            data[done[0]] = data.pop(name)


def _add_test_accuracy(ctx: RunContext, rows: list[LedgerRow]) -> None:
    """Give a stage's new ledger rows the PyTorch student's test-split accuracy where the stage measured
    the PyTorch student on val (a row whose notes name another runtime in ``accuracy_on``, like the
    quantize stage's shipped file, keeps only its own figure: the benchmark scores those files on test)."""
    for row in rows:
        if row.test_accuracy is None and row.val_accuracy is not None and "accuracy_on" not in row.notes:
            row.test_accuracy = top1_accuracy(ctx.student, *ctx.data.test_tensors())


class Runner:
    """Runs a validated recipe in a run directory (``out``, or ``runs_root/<name>/<time>``).

    ``teacher``: a trained module that replaces the recipe's checkpoint/training (Python API);
    ``datasets``: the (train, test) or (train, val, test) splits of ``data: {dataset: memory}``.
    ``run()`` returns a ``RunResult`` whose report holds the gate's verdict; it never raises for a
    failed gate (the CLI turns one into exit code 3).
    """

    def __init__(self, recipe: Recipe, *, out: Path | None = None, resume: bool = False,
                 console: Console | None = None, runs_root: Path = Path("runs"),
                 teacher: torch.nn.Module | None = None, datasets: Any = None) -> None:
        self.recipe = recipe
        self.teacher = teacher
        self.datasets = datasets
        self.resume = resume
        self.console = console or Console(stderr=True)
        self.run_dir = RunDir.choose(recipe.name, out, resume, runs_root)

    # -- manifest helpers -------------------------------------------------
    def _save(self, ctx: RunContext | None = None) -> None:
        if ctx is not None:
            root = self.run_dir.path
            self.manifest["artifacts"] = [a.to_json(root) for a in ctx.artifacts.values()]
            self.manifest["ledger"] = [asdict(row) for row in ctx.ledger]
        if self.is_main:
            self.run_dir.write_manifest(self.manifest)

    def _student_path(self, key: str) -> Path:
        return self.run_dir.path / "student" / f"after-{key}.pt"

    # -- the run ----------------------------------------------------------
    def run(self) -> RunResult:
        from edgekd.train.distributed import is_main_process, maybe_init_distributed, resolve_device

        device = resolve_device(self.recipe.device)
        maybe_init_distributed(device)
        self.is_main = is_main_process()
        steps = planned_steps(self.recipe)
        # the run's own checkpoints may name only the factories this recipe names
        named = (self.recipe.teacher.factory, self.recipe.student.factory)
        with trusted_factories(named), \
                (self.run_dir.lock() if self.is_main else contextlib.nullcontext(self.run_dir)):
            self.manifest = self._open_manifest(steps)
            if self.is_main and self.resume:
                # a killed run leaves the half-written file it was renaming into place; the step that
                # wrote it runs again, so nothing of value is lost
                for leftover in stale_temporaries(self.run_dir.path):
                    leftover.unlink(missing_ok=True)
            if self.is_main:
                resolved = self.recipe.model_dump(mode="json", by_alias=True)
                atomic_write_text(self.run_dir.path / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
            seed_everything(self.recipe.seed)
            data = load_data(self.recipe.data, self.recipe.seed, self.datasets)
            self.manifest["data"] = data.describe()
            self.console.print(f"[bold]edgekd[/] run [cyan]{self.recipe.name}[/] in {self.run_dir.path}  "
                               f"({len(data.train)} train / {len(data.val)} val / {len(data.test)} test samples, "
                               f"device {device})")
            try:
                ctx = self._run_teacher(data, device)
                for index, (key, stage) in enumerate(steps[1:], start=1):
                    record = self.manifest["stages"][index]
                    if record["status"] == "done":
                        self.console.print(f"  [dim]skip {key} (done in an earlier run)[/]")
                        continue
                    self._run_stage(ctx, index, key, stage)
            except Exception:
                # the report of the steps that finished, with the failed one named at its top: the prune
                # section that explains a dead student is there; the error itself leaves unchanged
                self._write_failed_report()
                raise
            report = self._write_report()
        return RunResult(self.run_dir.path, self.manifest, report)

    def _open_manifest(self, steps) -> dict[str, Any]:
        existing = self.run_dir.read_manifest() if self.resume else None
        if existing is None:
            return _new_manifest(self.recipe, steps)
        if existing.get("recipe_hash") != recipe_hash(self.recipe):
            raise ConfigError(f"the recipe differs from the one {self.run_dir.path} was started with",
                              hint="--resume needs the same recipe and --set values; start a new run otherwise")
        for record, (_, stage) in zip(existing["stages"], steps, strict=False):
            record.setdefault("name", _step_name(stage))
        _migrate_report_data(existing)
        return existing

    def _run_teacher(self, data, device) -> RunContext:
        record = self.manifest["stages"][0]
        started = time.perf_counter()
        record.update(status="running", started=now_iso(), error=None)
        self._save()
        try:
            teacher, info = prepare_teacher(self.recipe, data, self.run_dir.path, device,
                                            resume=self.resume, given=self.teacher,
                                            console=self.console)
        except BaseException as exc:
            self._fail(record, started, exc)
            raise
        example = data.example_batch(1)
        params, macs = count_params_macs(teacher, example)
        acc = top1_accuracy(teacher, data.val_x, data.val_y)
        test_acc = top1_accuracy(teacher, *data.test_tensors())
        if at_chance(acc, data.num_classes, 0.05):
            exc = StageError(f"the teacher reads {acc:.2f}% val top-1, chance for {data.num_classes} classes; a "
                             f"teacher at chance teaches nothing, so the run stops here",
                             hint="train it longer or with another lr (teacher.train), or check its checkpoint "
                                  "and the data's normalisation")
            self._fail(record, started, exc)
            raise exc
        earlier = self.manifest.get("teacher") or {}
        if "guard_events" in earlier and "guard_events" not in info:  # a resumed run keeps how its teacher trained
            info = {**info, "guard_events": earlier["guard_events"]}
        self.manifest["teacher"] = {"model": self.recipe.teacher.spec().describe(), "params": params, "macs": macs,
                                    "val_accuracy": acc, "test_accuracy": test_acc, **info}
        record.update(status="done", duration_s=round(time.perf_counter() - started, 3),
                      outputs=self._hashes([self.run_dir.path / "teacher" / "teacher.pt"]))
        self.console.print(f"  teacher {self.recipe.teacher.spec().describe()}: val top-1 {acc:.2f}%, test "
                           f"{test_acc:.2f}%  ({params:,} params, {macs / 1e6:.3g} MMACs)  [{info['source']}]")
        ctx = RunContext(recipe=self.recipe, run_dir=self.run_dir, data=data, device=device, teacher=teacher,
                         student=self._initial_student(teacher, data), resume=self.resume,
                         console=self.console)
        # restore before saving: saving a fresh context would overwrite the finished stages' artifacts
        self._restore(ctx)
        self._save(ctx)
        return ctx

    def _student_spec(self) -> ModelSpec:
        return self.recipe.student_spec()

    def _initial_student(self, teacher, data):
        spec = self.recipe.student.spec()
        if spec is None:
            return copy.deepcopy(teacher)
        return spec.build(data.num_classes, data.input_shape)

    def _restore(self, ctx: RunContext) -> None:
        """On resume: the artifacts, ledger and student of the finished steps (their report data stays
        in the manifest, filed by position)."""
        root = self.run_dir.path
        ctx.artifacts = {a.key: a for a in (Artifact.from_json(d, root) for d in self.manifest["artifacts"])}
        ctx.ledger = [LedgerRow(**row) for row in self.manifest["ledger"]]
        if not ctx.ledger:
            t = self.manifest["teacher"]
            ctx.ledger.append(LedgerRow(stage="teacher", params=t["params"], macs=t["macs"], key="teacher",
                                        val_accuracy=t["val_accuracy"], test_accuracy=t.get("test_accuracy")))
        done = [s["key"] for s in self.manifest["stages"][1:] if s["status"] == "done"]
        for key in reversed(done):
            path = self._student_path(key)
            if path.is_file():
                ctx.student, _ = load_portable(path)
                break

    def _run_stage(self, ctx: RunContext, index: int, key: str, stage: Stage) -> None:
        from edgekd.train.distributed import broadcast_module_state, world_size

        record = self.manifest["stages"][index]
        resumed = record["status"] in ("running", "failed")
        ctx.resume = self.resume and resumed
        record.update(status="running", started=now_iso(), error=None)
        self._save(ctx)
        self.console.print(f"[bold]▶ {key}[/]" + (" (resuming)" if ctx.resume else ""))
        started = time.perf_counter()
        # rows an earlier, failed attempt at this position left behind are replaced by this attempt's
        ctx.ledger = [row for row in ctx.ledger if row.key != key]
        rows_before = len(ctx.ledger)
        # the stage's working folder, report data and outputs are this position's own
        ctx.enter_stage(key, stage.name)
        try:
            try:
                if self.is_main or not stage.main_process_only:
                    stage.run(ctx)
                if world_size() > 1 and stage.main_process_only:
                    broadcast_module_state(ctx.student)
            except BaseException as exc:
                self._file_stage(ctx, key, rows_before)
                self._fail(record, started, exc, ctx)
                raise
            self._file_stage(ctx, key, rows_before)
        finally:
            ctx.leave_stage()
        if self.is_main:
            _add_test_accuracy(ctx, ctx.ledger[rows_before:])
        student_file = self._student_path(key)
        if self.is_main:
            ctx.student.cpu().eval()
            save_portable(ctx.student, student_file, spec=self._student_spec(), num_classes=ctx.data.num_classes,
                          input_shape=ctx.data.input_shape, extra={"role": "student", "after": key})
        record.update(status="done", duration_s=round(time.perf_counter() - started, 3),
                      outputs=self._hashes([*ctx.stage_outputs, student_file]))
        self._save(ctx)

    def _file_stage(self, ctx: RunContext, key: str, rows_before: int) -> None:
        """Mark the stage's new ledger rows with its position and file its report data under it (replacing
        what an earlier attempt at the same position filed)."""
        for row in ctx.ledger[rows_before:]:
            row.key = row.key or key
        data = self.manifest["report_data"]
        for stale in [k for k in data if k == key or k.startswith(f"{key}/")]:
            del data[stale]
        data.update(ctx.stage_report_entries())

    def _fail(self, record, started, exc: BaseException, ctx: RunContext | None = None) -> None:
        message = str(exc) if isinstance(exc, EdgekdError) else "".join(
            traceback.format_exception_only(type(exc), exc)).strip()
        record.update(status="failed", duration_s=round(time.perf_counter() - started, 3),
                      error=message or type(exc).__name__)
        self._save(ctx)

    def _hashes(self, paths) -> dict[str, str]:
        if not self.is_main:
            return {}
        return {self.run_dir.rel(p): sha256_file(p) for p in paths if Path(p).is_file()}

    def _write_failed_report(self) -> None:
        """Write the report of a run a step stopped (the manifest names the failed step and its error).
        A report that cannot be written is a warning here, never the error the run ends with."""
        if not self.is_main:
            return
        try:
            self._write_report()
        except Exception as exc:  # noqa: BLE001 - the step's own error is the one to raise
            self.console.print(f"  [yellow]warning:[/] no report for the failed run: {exc}")
        else:
            self.console.print(f"  report of the finished steps: {self.run_dir.path / 'report.md'}")

    def _write_report(self):
        if not self.is_main:
            return None
        from edgekd.report.build import write_all_reports

        # the one evaluation of the gate: the running recipe's, filed in the report
        return write_all_reports(self.run_dir.path, self.recipe.gate)
