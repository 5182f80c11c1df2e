"""The Python API: what the ``edgekd`` commands do, as functions that return results and raise errors.

``compress`` runs a recipe end to end and returns a ``RunResult`` (the run folder, the parsed report
and the accuracy gate's verdict); ``validate`` checks a recipe without training; ``export`` and
``benchmark`` work on model files. Nothing here prints a traceback or exits: every expected failure
is an ``edgekd.errors.EdgekdError`` subclass (``exit_code`` says what the CLI would exit with: 2 bad
input, 1 a failed stage), and a failed gate is a verdict (``result.passed`` is False), not an error.
The CLI (``edgekd.cli``) calls these functions and only maps their errors to exit codes.

A recipe is a YAML path, a dict of the same sections, or an ``edgekd.recipe.schema.Recipe``. From
Python, two inputs need no file:

- ``teacher=``: a trained ``torch.nn.Module``. It replaces the recipe's ``teacher.checkpoint`` /
  ``teacher.train`` (no teacher training); the recipe's ``teacher`` still names the architecture
  (``model:`` a built-in or ``factory: package.module:function``) because every saved model of a run
  is rebuilt from it (the export stage's child process, ``--resume``, ``edgekd export``). Its weights
  must fit that architecture (``ModelError`` otherwise).
- ``data=``: ``(train, test)`` or ``(train, val, test)``, each a torch ``Dataset`` of ``(x, y)``
  samples or an ``(x, y)`` pair of tensors/arrays (x float (N, ...), y int class indices (N,)). The
  recipe's ``data`` section becomes ``{dataset: memory}`` keeping its common settings (batch_size,
  val_fraction, test_fraction, normalize); val is held out of train, stratified, when two are given.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from torch import nn

from edgekd.errors import ConfigError, RecipeError
from edgekd.pipeline.runner import RunResult
from edgekd.pipeline.validate import ValidationSummary
from edgekd.recipe.load import RecipeDocument
from edgekd.recipe.schema import Recipe

__all__ = ["RunResult", "ValidationSummary", "benchmark", "compress", "export", "load", "validate"]

RecipeLike = str | Path | dict | Recipe
#: the export formats ``export`` writes
FORMATS = ("onnx", "ort", "pte")


def _python_inputs(teacher_given: bool, data_given: bool):
    """The edits a teacher module / in-memory data make to a recipe mapping before it is validated."""
    from edgekd.data.config import InMemoryData

    common = [name for name in InMemoryData.model_fields if name != "dataset"]

    def adjust(data: dict) -> None:
        if teacher_given and isinstance(data.get("teacher"), dict):
            for key in ("train", "checkpoint"):  # how to get weights: the module is the weights
                data["teacher"].pop(key, None)
        if data_given:
            section = data.get("data") if isinstance(data.get("data"), dict) else {}
            data["data"] = {"dataset": "memory", **{k: v for k, v in section.items() if k in common}}

    return adjust


def load(recipe: RecipeLike, overrides: Sequence[str] = (), *, teacher_given: bool = False,
         data_given: bool = False) -> RecipeDocument:
    """Parse and validate the schema of ``recipe`` (path, dict or ``Recipe``) with ``overrides``
    ("dotted.key=value", as ``--set``). Raises ``RecipeError`` (exit 2) naming the file, line and key
    (a dict or ``Recipe`` has no lines: the key alone)."""
    from edgekd.recipe.load import load_recipe, parse_recipe_data

    context = {"teacher_given": True} if teacher_given else None
    adjust = _python_inputs(teacher_given, data_given)
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe, list(overrides), context=context, adjust=adjust)
    if isinstance(recipe, Recipe):
        return parse_recipe_data(recipe.model_dump(mode="json", by_alias=True), "<Recipe object>", None,
                                 list(overrides), context=context, adjust=adjust)
    if isinstance(recipe, dict):
        # a deep copy: the caller's dict is theirs (overrides and the edits above would change it)
        return parse_recipe_data(copy.deepcopy(recipe), "<recipe dict>", None, list(overrides), context=context,
                                 adjust=adjust)
    raise ConfigError(f"a recipe is a YAML path, a dict or an edgekd Recipe, not {type(recipe).__name__}",
                      hint="edgekd.compress('recipes/quickstart.yaml') or edgekd.compress({'name': ..., ...})")


def _check_inputs(teacher: Any, data: Any) -> None:
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise ConfigError(f"teacher= must be a torch.nn.Module, not {type(teacher).__name__}",
                          hint="pass the trained model object; a checkpoint file goes in the recipe's teacher.checkpoint")
    if data is not None and not (isinstance(data, (tuple, list)) and len(data) in (2, 3)):
        raise RecipeError(f"data= must be (train, test) or (train, val, test), not {type(data).__name__}"
                          + (f" of {len(data)}" if isinstance(data, (tuple, list)) else ""), key="data",
                          hint="each split a torch Dataset of (x, y) samples or an (x, y) pair of tensors")


def validate(recipe: RecipeLike, *, teacher: nn.Module | None = None, data: Any = None,
             overrides: Sequence[str] = ()) -> ValidationSummary:
    """Everything ``edgekd validate`` checks, without training: the schema, the data loads, the models build
    with the data's shape, the teacher's weights fit, each stage's layer names and shapes on one real batch.

    Returns a ``ValidationSummary`` (dataset, train/val sample counts, classes, input shape, stage names);
    raises ``RecipeError``/``DataError``/``ModelError`` (exit 2) at the first problem.
    """
    from edgekd.pipeline.validate import validate_document

    _check_inputs(teacher, data)
    doc = load(recipe, overrides, teacher_given=teacher is not None, data_given=data is not None)
    return validate_document(doc, teacher=teacher, datasets=data)


def compress(recipe: RecipeLike, *, teacher: nn.Module | None = None, data: Any = None, out: str | Path | None = None,
             overrides: Sequence[str] = (), resume: bool = False, console: Console | None = None,
             quiet: bool = False) -> RunResult:
    """Validate and run ``recipe`` end to end (teacher, stages, benchmark, report), as ``edgekd compress``.

    ``teacher``/``data``: a trained module and in-memory splits (see the module docstring). ``out``: the
    run folder (default ``runs/<name>/<time>``); ``resume``: continue the run in ``out``. The runner's step
    lines, the trainers' epoch lines and the benchmark's lines go to ``console`` (default stderr);
    ``quiet=True`` hides them all (library warnings still reach the ``warnings`` module).

    Returns a ``RunResult``: ``run_dir``; ``report`` (``edgekd.report.schema.Report``: ledger rows with
    params, MACs and val/test top-1 in %, artifacts, benchmark timings in ms, accuracy drops in points);
    ``report_files`` (report.json/.md/.html); ``gate`` (``GateResult`` with ``passed`` and ``message``, or
    None without a gate) and ``passed``; ``student`` (the final student's portable .pt); ``manifest``.
    A failed gate returns ``passed=False``; it does not raise. Raises ``EdgekdError`` subclasses for bad
    input (exit code 2) and failed stages (1); the run folder keeps what finished before.
    """
    from edgekd.pipeline.runner import Runner
    from edgekd.pipeline.validate import validate_document

    _check_inputs(teacher, data)
    doc = load(recipe, overrides, teacher_given=teacher is not None, data_given=data is not None)
    validate_document(doc, teacher=teacher, datasets=data)
    if console is None:
        console = Console(stderr=True, quiet=quiet)
    return Runner(doc.recipe, out=Path(out) if out is not None else None, resume=resume, console=console,
                  teacher=teacher, datasets=data).run()


def export(model: str | Path, to: str, *, out: str | Path | None = None, opset: int = 18, atol: float = 1e-3,
           rtol: float | None = None, factories: Iterable[str] = ()) -> Path:
    """Export a portable ``.pt`` checkpoint of a run (``student/after-*.pt``, ``teacher/teacher.pt``) to
    ``to`` = "onnx", "ort" (ORT Mobile; also writes the .onnx) or "pte" (ExecuTorch, XNNPACK), verified
    for parity on real samples: ``atol`` on each logit, ``rtol`` relative to each sample's largest |logit|.
    Returns the file written (default: the checkpoint's path with the format's suffix).

    ``factories``: user factories (package.module:function) the checkpoint may name; any other raises
    ``ModelError`` (a file never chooses code to run). Raises ``ConfigError`` for an unknown format,
    ``ParityError`` when the file disagrees with PyTorch, ``RuntimeUnavailableError`` for a missing exporter.
    """
    from edgekd.export.command import export_model
    from edgekd.export.config import DEFAULT_RTOL

    if to not in FORMATS:
        raise ConfigError(f"--to {to!r} is not a known format", hint=f"valid choices: {', '.join(FORMATS)}")
    return export_model(Path(model), to, Path(out) if out is not None else None, opset=opset, atol=atol,
                        rtol=DEFAULT_RTOL if rtol is None else rtol, factories=tuple(factories))


def benchmark(model: str | Path, *, against: str | Path | None = None, threads: list[int] | None = None,
              batch_sizes: list[int] | None = None, out: str | Path | None = None, factories: Iterable[str] = (),
              warmup: int = 5, min_time_s: float = 1.0, min_iters: int = 20, memory: bool = True,
              peak: bool = True, console: Console | None = None, quiet: bool = False):
    """Time ``model`` (.onnx, .ort, .pte or portable .pt, as the student) on its runtime, interleaved with
    ``against`` (the teacher file) when given, at each thread count and batch size, as ``edgekd benchmark``:
    ``warmup`` untimed calls, then rounds for at least ``min_time_s`` seconds and ``min_iters`` rounds;
    ``memory``: peak memory in a fresh subprocess per file; ``peak``: an FP32 GEMM reference per thread count.

    Returns a ``BenchmarkResult`` (``timings``: latency percentiles in ms per runtime/threads/batch;
    ``models``: size, accuracy where data is known). With ``out`` (a folder) it also writes
    ``benchmark.json`` and report.json/.md/.html there. Raises ``ConfigError`` for an unknown file type,
    ``ArtifactError``/``StageError`` for a file its runtime cannot load.
    """
    from edgekd.commands.benchmark import benchmark_files

    return benchmark_files(Path(model), Path(against) if against is not None else None, threads=threads,
                           batch_sizes=batch_sizes, warmup=warmup, min_time_s=min_time_s, min_iters=min_iters,
                           memory=memory, peak=peak, out=Path(out) if out is not None else None,
                           console=console or Console(quiet=quiet), factories=tuple(factories))
