"""The conformance zoo: every zoo model through the whole chain with the real CLI, one table.

For each model in ``tests/zoo_models.py`` a recipe is written to the output folder and
``edgekd compress`` runs it in a subprocess (cwd = the repository root, so the recipes' factories
``tests.zoo_models:NAME`` import): the teacher trains a few epochs on digits (or MNIST-1D for
1-D models), the student is the teacher pruned 50% (channels in multiples of 8), distilled at
most 4 epochs, exported to ONNX / .ort / .pte, quantized to INT8 (ONNX Runtime, kept only when
measured faster), benchmarked at batch 1, and gated at 2 points of top-1. The figures come from
the run's ``manifest.json`` and ``report.json`` (``edgekd.report.schema``).

    python tools/zoo.py                               # every model (about 1-4 minutes each on 2 cores)
    python tools/zoo.py --models hf_vit,grouped_conv  # a subset
    python tools/zoo.py --family hf --json zoo.json   # only the Hugging Face models; results as JSON
    python tools/zoo.py --markdown docs/zoo-table.md  # the table as Markdown too

Exit status: 0 when every model ran end to end with the gate passed and every student artifact
verified (a run that carries on past a failed format is PARTIAL), or was refused at validation with
a message naming a layer; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgekd.report.schema import stage_data_of  # noqa: E402
from tests.zoo_models import ZOO, ZooModel  # noqa: E402
from tools._compress import run_compress  # noqa: E402

#: the recipe's stages, in run order, as the manifest names them ("1-prune", ...)
STAGES = ("teacher", "prune", "distill", "export", "quantize", "benchmark")
EXIT_MEANING = {0: "ok", 1: "stage failed", 2: "bad input", 3: "gate failed", 124: "timeout"}


def recipe_for(zoo: ZooModel, *, teacher_epochs: int | None, distill_epochs: int, gate: float) -> dict[str, Any]:
    """The recipe a user would write for this model (plain YAML data); ``teacher_epochs`` None: the
    model's own (``ZooModel.teacher_epochs``)."""
    if zoo.dataset == "digits":
        data: dict[str, Any] = {"dataset": "digits", "image_size": zoo.input_shape[-1], "batch_size": 64}
    else:
        data = {"dataset": "mnist1d", "num_samples": 4000, "batch_size": 64}
    return {
        "name": f"zoo-{zoo.name}".replace("_", "-"),
        "seed": 0,
        "data": data,
        "teacher": {**zoo.recipe_model(), "train": {"epochs": teacher_epochs or zoo.teacher_epochs, **zoo.train}},
        "student": {"from": "teacher"},
        "stages": [
            {"prune": {"importance": "l2", "ratio": 0.5, "round_to": 8, "probe": None}},
            # alpha, lr (SGD) and warm-up left to edgekd's defaults for a student that starts from trained
            # weights (alpha 0.5: the pruned student recovers better with more hard-label weight, see
            # docs/distill.md), as a user writing this recipe would leave them
            {"distill": {"epochs": distill_epochs, "temperature": 4, **zoo.train}},
            {"export": {"formats": ["onnx", "ort", "pte"]}},
            {"quantize": {"method": {"kind": "ort_static", "calibration": {"samples": 256}},
                          "max_accuracy_drop": 1.0,
                          "speed": {"threads": 1, "batch_size": 1, "min_time_s": 0.3}}},
        ],
        "benchmark": {"runtimes": ["torch", "onnxruntime", "ort-mobile", "executorch"], "threads": [1],
                      "batch_sizes": [1], "warmup": 2, "min_time_s": 0.3, "min_iters": 10,
                      "memory": False, "peak": False},
        "gate": {"max_accuracy_drop": gate},
    }


@dataclass
class ZooResult:
    """One model's run, as read back from its run directory."""

    name: str
    family: str
    exit_code: int | None = None
    outcome: str = ""
    seconds: float = 0.0
    stages: dict[str, str] = field(default_factory=dict)  # stage -> done | failed | pending | skipped
    error: str | None = None  # the first failed stage's error (or the CLI's message), first line
    error_detail: str | None = None  # the rest of that error, up to a few lines
    teacher_top1: float | None = None
    student_top1: float | None = None  # after the last training stage (validation split, PyTorch)
    after_prune_top1: float | None = None
    params_reduction: float | None = None
    macs_reduction: float | None = None
    kept_whole: list[str] = field(default_factory=list)  # "layer: reason"
    parity: dict[str, str] = field(default_factory=dict)  # student format -> ok | failed (why)
    int8: str | None = None
    speedup: dict[str, float] = field(default_factory=dict)  # runtime -> deployed student vs teacher, batch 1
    gate: str | None = None
    run_dir: str = ""


def _first_line(text: str | None) -> str | None:
    if not text:
        return None
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0][:400] if lines else None


def _cli_error(stderr: str) -> str | None:
    """The CLI's own one-line error ("error: ..."), or a traceback's last line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if line.lower().startswith("error"):
            return " ".join(lines[i:i + 3])[:600]
    tail = [ln for ln in lines if not ln.startswith(("File ", "^", "~"))]
    return tail[-1][:600] if tail else None


def read_run(result: ZooResult, run_dir: Path) -> None:
    """Fill ``result`` from ``manifest.json`` and ``report.json`` (whichever exist)."""
    manifest_file, report_file = run_dir / "manifest.json", run_dir / "report.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else None
    report = json.loads(report_file.read_text()) if report_file.is_file() else None
    if manifest is None:
        return
    for stage in manifest.get("stages", []):
        name = stage["key"].split("-", 1)[-1]
        result.stages[name] = stage["status"]
        if stage["status"] == "failed" and result.error is None:
            result.error = f"{name}: {_first_line(stage.get('error'))}"
            rest = (stage.get("error") or "").strip().splitlines()[1:6]
            result.error_detail = "\n".join(rest) or None
    teacher = manifest.get("teacher") or {}
    result.teacher_top1 = teacher.get("val_accuracy")
    ledger = manifest.get("ledger") or []
    trained = [row for row in ledger if row.get("stage") in ("distill", "finetune")]
    if trained:
        result.student_top1 = trained[-1].get("val_accuracy")
    prune = (stage_data_of(manifest, "prune") or [{}])[-1] or {}
    result.after_prune_top1 = prune.get("val_accuracy_after_prune")
    result.params_reduction = prune.get("params_reduction_vs_teacher")
    result.macs_reduction = prune.get("macs_reduction_vs_teacher")
    result.kept_whole = [f"{row['layer']} ({row['before']}->{row['after']}): {row['reason']}"
                         for row in prune.get("kept_whole", []) or []]
    for artifact in manifest.get("artifacts", []):
        if artifact.get("role") != "student" or artifact.get("precision", "fp32") != "fp32":
            continue
        fmt, status = artifact.get("fmt") or artifact.get("format"), artifact.get("status")
        info = artifact.get("info") or {}
        why = _first_line(info.get("error")) or ("parity" if (info.get("parity") or {}).get("passed") is False else "")
        result.parity[str(fmt)] = "ok" if status == "ok" else f"{status}" + (f" ({why})" if why else "")
    quantize = (stage_data_of(manifest, "quantize") or [{}])[-1] or {}
    result.int8 = _int8_decision(quantize)
    if report is not None:
        deployed = "student-int8" if result.int8 and result.int8.startswith("shipped") else "student"
        for row in report.get("comparisons", []):
            if row.get("batch_size") == 1 and row.get("threads") == 1 and row.get("model") == deployed \
                    and row.get("speedup") is not None:
                result.speedup[row["runtime"]] = round(row["speedup"], 2)
        gate = report.get("gate")
        if gate:
            worst = gate.get("worst") or {}
            result.gate = ("passed" if gate.get("passed") else "FAILED") + (
                f" (drop {worst['drop']:.2f} on {worst['runtime']})" if worst else "")


def _int8_decision(quantize: dict[str, Any]) -> str | None:
    """The quantize stage's verdict in a few words (shipped INT8 or kept FP32, and why)."""
    if not quantize:
        return None
    for key in ("decision", "verdict", "shipped", "outcome"):
        value = quantize.get(key)
        if isinstance(value, str):
            return value[:160]
        if isinstance(value, dict):
            text = value.get("summary") or value.get("reason") or value.get("message")
            if text:
                return str(text)[:160]
    return json.dumps(quantize)[:160]


def run_one(zoo: ZooModel, out: Path, args: argparse.Namespace) -> ZooResult:
    """Write the model's recipe, run ``edgekd compress`` on it, read the run back."""
    result = ZooResult(zoo.name, zoo.family)
    folder = out / zoo.name
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for(zoo, teacher_epochs=args.teacher_epochs,
                                                distill_epochs=args.distill_epochs, gate=args.gate),
                                     sort_keys=False))
    run_dir = folder / "run"
    if run_dir.exists():  # a fresh run each time: --out refuses to overwrite a finished run
        import shutil

        shutil.rmtree(run_dir)
    run = run_compress(recipe, run_dir, nice=args.nice, timeout=args.timeout)
    result.exit_code, result.seconds, stdout, stderr = run.exit_code, run.seconds, run.stdout, run.stderr
    (folder / "stdout.log").write_text(stdout)
    (folder / "stderr.log").write_text(stderr)
    result.run_dir = str(run_dir)
    read_run(result, run_dir)
    if result.exit_code != 0 and result.error is None:  # a failed gate says by how much: one line per failure
        result.error = _cli_error(stderr)
    if result.exit_code == 124:
        result.error = f"timed out after {args.timeout} s" + (f" (last: {result.error})" if result.error else "")
    result.outcome = _outcome(result, stderr)
    return result


def _outcome(result: ZooResult, stderr: str) -> str:
    code = result.exit_code
    if code == 0:
        # the run carries on past a format that failed (issue 13 item 5), but the whole chain has not passed
        failed = sorted(fmt for fmt, status in result.parity.items() if status != "ok")
        if failed:
            if result.error is None:
                result.error = "artifacts failed: " + "; ".join(f"{fmt}: {result.parity[fmt]}" for fmt in failed)
            return "PARTIAL"
        return "PASS"
    if code == 3:
        return "GATE"
    if code == 2:
        return "REFUSED"  # bad input: validation stopped it (the error says whether a layer is named)
    if code == 124:
        return "TIMEOUT"
    return "TRACEBACK" if "Traceback (most recent call last)" in stderr else "FAIL"


# -- the table ---------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _stage_cell(result: ZooResult) -> str:
    marks = {"done": "ok", "failed": "FAIL", "pending": "-", "running": "?"}
    return " ".join(f"{s[:4]}:{marks.get(result.stages.get(s, 'pending'), result.stages.get(s, '-'))}"
                    for s in STAGES)


def rows(results: list[ZooResult]) -> list[list[str]]:
    table = []
    for r in results:
        parity = " ".join(f"{fmt}:{'ok' if v == 'ok' else 'FAIL'}" for fmt, v in sorted(r.parity.items())) or "-"
        speed = " ".join(f"{k}:{v:.2f}x" for k, v in sorted(r.speedup.items())) or "-"
        cut = "-" if r.params_reduction is None else f"{r.params_reduction:.1f}x/{r.macs_reduction:.1f}x"
        table.append([r.name, r.outcome, _stage_cell(r), _pct(r.teacher_top1), _pct(r.after_prune_top1),
                      _pct(r.student_top1), cut, str(len(r.kept_whole)), parity, (r.int8 or "-")[:40], speed,
                      f"{r.seconds:.0f}"])
    return table


HEADER = ["model", "outcome", "stages", "teacher %", "pruned %", "student %", "params/MACs cut",
          "kept whole", "student parity", "INT8", "speed-up b1 (deployed vs teacher)", "s"]


def markdown(results: list[ZooResult]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows(results)]
    failures = [r for r in results if r.error]
    if failures:
        lines += ["", "Failures (first line of the error; the stage and layer it names):", ""]
        lines += [f"- **{r.name}** ({r.outcome}, exit {r.exit_code}): {r.error}" for r in failures]
    kept = [r for r in results if r.kept_whole]
    if kept:
        lines += ["", "Layers left wider than asked (from prune.json `kept_whole`):", ""]
        for r in kept:
            shown = "; ".join(r.kept_whole[:3]) + (f"; ... ({len(r.kept_whole)} in all)" if len(r.kept_whole) > 3 else "")
            lines.append(f"- **{r.name}**: {shown}")
    return "\n".join(lines)


def plain(results: list[ZooResult]) -> str:
    table = [HEADER, *rows(results)]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in table)


def machine() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        name = "?"
    return f"{name}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated zoo names (default: all)")
    parser.add_argument("--family", choices=["hf", "arch", "kind", "builtin"], help="only this family")
    parser.add_argument("--jobs", type=int, default=1, help="models run at once (1 on a 2-core machine)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per model before it is stopped")
    parser.add_argument("--teacher-epochs", type=int, default=None,
                        help="teacher epochs for every model (default: each model's own, 6 for most)")
    parser.add_argument("--distill-epochs", type=int, default=4)
    parser.add_argument("--gate", type=float, default=2.0, help="max_accuracy_drop in points")
    parser.add_argument("--out", type=Path, default=Path("/tmp/edgekd-zoo"), help="recipes, logs and runs")
    parser.add_argument("--json", type=Path, help="write every result as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    parser.add_argument("--nice", type=int, default=0, help="run each compress under nice -n N")
    args = parser.parse_args(argv)

    names = args.models.split(",") if args.models else list(ZOO)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        parser.error(f"unknown zoo model(s): {', '.join(unknown)}; known: {', '.join(ZOO)}")
    chosen = [ZOO[n] for n in names if args.family is None or ZOO[n].family == args.family]
    args.out.mkdir(parents=True, exist_ok=True)

    def one(zoo: ZooModel) -> ZooResult:
        result = run_one(zoo, args.out, args)
        print(f"{zoo.name}: {result.outcome} in {result.seconds:.0f} s" + (f" - {result.error}" if result.error else ""),
              file=sys.stderr, flush=True)
        return result

    done: list[ZooResult] = []

    def save() -> None:  # after every model, so a long run can be read while it goes on
        ordered = sorted(done, key=lambda r: names.index(r.name))
        if args.json:
            args.json.write_text(json.dumps({"machine": machine(), "results": [asdict(r) for r in ordered]},
                                            indent=1))
        if args.markdown:
            args.markdown.write_text(markdown(ordered) + "\n")

    def one_saved(zoo: ZooModel) -> ZooResult:
        result = one(zoo)
        done.append(result)
        save()
        return result

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one_saved, chosen))
    print(f"machine: {machine()}")
    print(plain(results))
    ok = all(r.outcome == "PASS" or (r.outcome == "REFUSED" and r.error) for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
