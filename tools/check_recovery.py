"""Issue 14's recovery cases: does a healthy pruned student recover without ever getting worse?

Two cases, each a recipe written to a temporary folder and run with ``edgekd compress`` in a
subprocess (cwd = the repository root, so ``tests.*`` factories import): digits at 32x32 with one
input channel, a teacher trained 6 epochs, the student pruned 50% by L2 magnitude in multiples of 8,
distilled 4 epochs with the default settings, gated at 2 points on the test split. Only prune,
distill and the gate run (no export, quantize or benchmark).

- ``mobilenet_v2``: Hugging Face MobileNetV2 at width 0.25 (``tests.zoo_models:hf_mobilenet_v2``);
- ``resnet18``: Hugging Face ResNet-18, basic blocks 2-2-2-2, widths 64-512 (``tests.recovery_models``).

Printed per case: teacher test %, the student's val % after pruning (the start of recovery), each
recovery epoch's val %, the final student's test %, the drop, and whether any epoch ended below the
start. Figures come from the run's ``report.json`` and ``manifest.json``.

    python tools/check_recovery.py                         # both cases, seed 0
    python tools/check_recovery.py --cases resnet18 --seed 1 --nice 10
    python tools/check_recovery.py --distill temperature=2 --json /tmp/recovery.json

Exit status 0 when every case passes the gate and no epoch ends below its start; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools._compress import run_compress  # noqa: E402

#: case name -> the teacher's factory
CASES = {
    "mobilenet_v2": "tests.zoo_models:hf_mobilenet_v2",
    "resnet18": "tests.recovery_models:hf_resnet18",
}


def recipe_for(name: str, *, seed: int, teacher_epochs: int, distill_epochs: int, gate: float,
               distill_extra: dict[str, Any], teacher_extra: dict[str, Any] | None = None,
               prune_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The case's recipe (plain YAML data): prune + distill + gate, nothing exported."""
    return {
        "name": f"recovery-{name}".replace("_", "-"),
        "seed": seed,
        "data": {"dataset": "digits", "image_size": 32, "batch_size": 64},
        "teacher": {"factory": CASES[name], "train": {"epochs": teacher_epochs, **(teacher_extra or {})}},
        "student": {"from": "teacher"},
        "stages": [
            {"prune": {"importance": "l2", "ratio": 0.5, "round_to": 8, "probe": None, **(prune_extra or {})}},
            {"distill": {"epochs": distill_epochs, **distill_extra}},
        ],
        "gate": {"max_accuracy_drop": gate},
    }


@dataclass
class CaseResult:
    name: str
    exit_code: int | None = None
    seconds: float = 0.0
    teacher_test: float | None = None
    after_prune_val: float | None = None  # the student's val top-1 when recovery starts
    epochs_val: list[float] = field(default_factory=list)  # each recovery epoch's val top-1
    guard: list[str] = field(default_factory=list)  # rollbacks / BatchNorm recalibrations
    student_test: float | None = None
    drop: float | None = None
    below_start: bool | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def read_run(result: CaseResult, run_dir: Path) -> None:
    """Fill ``result`` from the run's ``manifest.json`` (history, guard) and ``report.json`` (test figures)."""
    manifest_file, report_file = run_dir / "manifest.json", run_dir / "report.json"
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        for stage in manifest.get("stages", []):
            if stage.get("status") == "failed" and result.error is None:
                result.error = f"{stage['key']}: {(stage.get('error') or '').strip().splitlines()[0][:300]}"
        data = manifest.get("report_data") or {}
        # keyed by stage ("distill") or, since stages may repeat, by position and stage ("1-distill")
        distill = next((v for k, v in reversed(list(data.items())) if k.split("-", 1)[-1] == "distill"), {})
        start = distill.get("val_at_start")
        # rounded as the epochs are: the same count of val samples right must not read as "below the start"
        result.after_prune_val = None if start is None else round(start, 2)
        result.epochs_val = [round(row["val_accuracy"], 2) for row in distill.get("history", [])]
        result.settings = distill.get("settings") or {}
        for event in distill.get("guard_events", []):
            result.guard.append(f"epoch {event['epoch']}: {event['action']}"
                                + (f" ({event['reason']})" if event.get("reason") else ""))
        teacher = manifest.get("teacher") or {}
        result.teacher_test = teacher.get("test_accuracy")
        rows = [r for r in manifest.get("ledger") or [] if r.get("stage") == "distill"]
        if rows:
            result.student_test = rows[-1].get("test_accuracy")
    if report_file.is_file():
        report = json.loads(report_file.read_text())
        worst = ((report.get("gate") or {}).get("worst")) or {}
        if worst:
            result.teacher_test = worst.get("teacher_top1_pct", result.teacher_test)
            result.student_test = worst.get("top1_pct", result.student_test)
            result.drop = worst.get("drop")
    if result.drop is None and result.teacher_test is not None and result.student_test is not None:
        result.drop = result.teacher_test - result.student_test
    if result.after_prune_val is not None and result.epochs_val:
        result.below_start = any(v < result.after_prune_val for v in result.epochs_val)


def run_case(name: str, out: Path, args: argparse.Namespace) -> CaseResult:
    result = CaseResult(name)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for(name, seed=args.seed, teacher_epochs=args.teacher_epochs,
                                                distill_epochs=args.distill_epochs, gate=args.gate,
                                                distill_extra=args.distill, teacher_extra=args.teacher,
                                                prune_extra=args.prune),
                                     sort_keys=False))
    run_dir = folder / "run"
    run = run_compress(recipe, run_dir, nice=args.nice, timeout=args.timeout)
    result.exit_code, result.seconds = run.exit_code, run.seconds
    (folder / "stderr.log").write_text(run.stderr)
    if run.exit_code == 124:
        result.error = f"timed out after {args.timeout} s"
    read_run(result, run_dir)
    if result.exit_code not in (0, 3) and result.error is None and (folder / "stderr.log").is_file():
        lines = [ln for ln in (folder / "stderr.log").read_text().splitlines() if ln.strip()]
        result.error = lines[-1][:300] if lines else f"exit {result.exit_code}"
    return result


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(results: list[CaseResult]) -> str:
    header = ["case", "exit", "teacher test %", "after prune (val %)", "recovery epochs (val %)",
              "student test %", "drop", "epoch below start", "s"]
    rows = [header] + [[r.name, str(r.exit_code), _pct(r.teacher_test), _pct(r.after_prune_val),
                        " ".join(f"{v:.2f}" for v in r.epochs_val) or "-", _pct(r.student_test), _pct(r.drop),
                        {None: "-", True: "YES", False: "no"}[r.below_start], f"{r.seconds:.0f}"]
                       for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def _value(text: str) -> Any:
    return yaml.safe_load(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--distill-epochs", type=int, default=4)
    parser.add_argument("--gate", type=float, default=2.0, help="max_accuracy_drop in points (test split)")
    parser.add_argument("--distill", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra key of the distill stage (YAML value), e.g. lr=0.005; repeatable")
    parser.add_argument("--prune", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra key of the prune stage, e.g. steps=3; repeatable")
    parser.add_argument("--teacher", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra key of the teacher's train block, e.g. lr=0.01; repeatable")
    parser.add_argument("--out", type=Path, help="keep recipes, logs and runs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--nice", type=int, default=10, help="run each compress under nice -n N (0: not)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per case")
    args = parser.parse_args(argv)
    names = args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)}; known: {', '.join(CASES)}")
    args.distill = {k: _value(v) for k, v in (item.split("=", 1) for item in args.distill)}
    args.teacher = {k: _value(v) for k, v in (item.split("=", 1) for item in args.teacher)}
    args.prune = {k: _value(v) for k, v in (item.split("=", 1) for item in args.prune)}

    results = []
    with tempfile.TemporaryDirectory(prefix="edgekd-recovery-") as tmp:
        out = args.out or Path(tmp)
        for name in names:
            result = run_case(name, out, args)
            results.append(result)
            print(f"{name}: exit {result.exit_code} in {result.seconds:.0f} s"
                  + (f" - {result.error}" if result.error else ""), file=sys.stderr, flush=True)
            for line in result.guard:
                print(f"  guard: {line}", file=sys.stderr)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    ok = all(r.exit_code == 0 and r.below_start is False for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
