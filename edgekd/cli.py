"""The ``edgekd`` command line. Thin: every command calls the Python API (``edgekd.api``); only here do we exit.

Every expected failure is an ``EdgekdError``; ``main`` prints it as one clear message and
exits with its code (2 for bad input, 3 for a failed accuracy gate, 1 otherwise) without a
traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from edgekd.errors import EdgekdError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune, distill, quantize, export and benchmark PyTorch models for edge devices.")
err_console = Console(stderr=True)
out_console = Console()
_state = {"debug": False}

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False, metavar="RECIPE")]
FactoryOpt = Annotated[
    list[str] | None,
    typer.Option("--factory", help="trust a checkpoint that names this user factory (package.module:function); "
                 "edgekd never runs code a file names on its own", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a recipe value: dotted.key=value",
                                                     show_default=False)]


@app.callback()
def _global(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks for errors and libraries' "
                                                                "known-harmless messages")] = False) -> None:
    _state["debug"] = debug
    if not debug:
        # before any command imports torchao/transformers: their harmless start-up lines stay off stderr
        from edgekd.library_noise import quiet_known_library_noise

        quiet_known_library_noise()


@app.command()
def compress(
    recipe: RecipeArg,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="run directory (default runs/<name>/<time>)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out (or the newest run)")] = False,
) -> None:
    """Run a recipe end to end: teacher, student, stages, benchmark, report."""
    from edgekd.api import compress as run

    result = run(recipe, overrides=set_ or (), out=out, resume=resume, console=err_console)
    if result.report is not None:
        from edgekd.report.gate import raise_for_gate
        from edgekd.report.summary import print_summary

        print_summary(result.report, out_console)
        out_console.print(f"run directory: {result.run_dir}")
        raise_for_gate(result.report)  # the report's verdict: exit 3 when it failed


@app.command()
def validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check a recipe without training: schema, data, models, layer names."""
    from edgekd.api import validate as check

    summary = check(recipe, overrides=set_ or ())
    out_console.print(f"[green]ok[/] {recipe}: {summary.dataset} ({summary.train_samples} train / "
                      f"{summary.val_samples} val / {summary.test_samples} test, {summary.num_classes} classes, input {summary.input_shape}); "
                      f"stages: {', '.join(summary.stages) or 'none'}")


@app.command()
def schema() -> None:
    """Print the recipe's JSON Schema (for editor completion and checks)."""
    from edgekd.recipe.schema import Recipe

    sys.stdout.write(json.dumps(Recipe.model_json_schema(by_alias=True), indent=2) + "\n")


@app.command()
def export(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="portable .pt checkpoint from a run (student/ or teacher/)")],
    to: Annotated[str, typer.Option("--to", help="onnx, ort or pte")],
    out: Annotated[Path | None, typer.Option("--out", help="output file")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 18,
    atol: Annotated[float, typer.Option(help="parity: absolute tolerance on each logit")] = 1e-3,
    # = edgekd.export.config.DEFAULT_RTOL, written out: importing it here would slow every command's start
    rtol: Annotated[float, typer.Option(help="parity: tolerance relative to each sample's largest |logit|")] = 1e-2,
    factory: FactoryOpt = None,
) -> None:
    """Export a model checkpoint to ONNX, ORT Mobile (.ort) or ExecuTorch (.pte), verified for parity."""
    from edgekd.api import export as export_file

    written = export_file(model, to, out=out, opset=opset, atol=atol, rtol=rtol, factories=factory or ())
    out_console.print(f"wrote {written}")


@app.command()
def benchmark(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help=".onnx, .ort, .pte or portable .pt file (the student)")],
    against: Annotated[Path | None, typer.Option("--against", help="the teacher file to compare with")] = None,
    threads: Annotated[list[int] | None, typer.Option("--threads", help="thread counts")] = None,
    batch_sizes: Annotated[list[int] | None, typer.Option("--batch-size", help="batch sizes")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="folder for benchmark.json and reports")] = None,
    factory: FactoryOpt = None,
) -> None:
    """Time a model (and optionally its teacher, interleaved) on its runtime."""
    from edgekd.api import benchmark as time_files

    time_files(model, against=against, threads=threads, batch_sizes=batch_sizes, out=out, console=out_console,
               factories=factory or ())


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory", metavar="RUN_DIR")]) -> None:
    """Render report.json, report.md and report.html of a run again."""
    from edgekd.commands.report import render_report
    from edgekd.report.summary import print_summary

    print_summary(render_report(run_dir), out_console)


def main() -> None:
    try:
        code = app(standalone_mode=False)
        # Typer turns Ctrl-C into ``Exit(130)``, which it *returns* (not raises) in this mode
        if isinstance(code, int) and code != 0:
            if code == 130:
                err_console.print("interrupted: rerun with --resume to continue")
            sys.exit(code)
    except EdgekdError as exc:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {_escape(exc.message)}", highlight=False, soft_wrap=True)
        if exc.hint:
            err_console.print(f"  [yellow]hint:[/] {_escape(exc.hint)}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except (typer.Exit, SystemExit) as exc:
        sys.exit(getattr(exc, "exit_code", getattr(exc, "code", 0)))
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("interrupted: rerun with --resume to continue")
        sys.exit(130)
    except Exception as exc:  # usage errors (unknown option, missing argument) come through here in
        # standalone_mode=False
        if isinstance(exc, _usage_error_types()):
            exc.show()
            sys.exit(2)
        raise


def _usage_error_types() -> tuple[type[BaseException], ...]:
    """The command-line parser's error classes: click's, and the copy of click that Typer bundles from 0.29
    (``typer._click``), whose exceptions are not click's classes."""
    import importlib

    types = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            types.append(importlib.import_module(module).ClickException)
        except (ImportError, AttributeError):  # an older or newer Typer without the bundled copy
            continue
    return tuple(types)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


if __name__ == "__main__":
    main()
