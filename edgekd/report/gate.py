"""The accuracy gate: fail the run (exit code 3) when the student lost more than the recipe allows.

The drop is judged on what ships, on the test split (which no decision of the run saw): every
student model the benchmark scored (each runtime, FP32 and INT8) against the teacher on the same
runtime and samples; the worst one decides. Without benchmark accuracy it falls back to the
PyTorch test accuracies of the run's ledger. A figure measured on the val split never passes it.

The gate is evaluated once, by ``build_report`` (``report.gate``), and the report files record it.
``edgekd.compress`` returns that verdict; the CLI turns a failed one into exit code 3 with
``raise_for_gate`` after every report file is written, so a failed gate still leaves the evidence on disk.
"""

from __future__ import annotations

from edgekd.errors import GateFailedError
from edgekd.report.schema import GateResult, Report

#: the only split the gate reads
GATE_SPLIT = "test"


def evaluate_gate(report: Report, max_accuracy_drop: float) -> GateResult:
    worst = report.worst_drop(GATE_SPLIT)
    if worst is None:
        return GateResult(max_accuracy_drop=max_accuracy_drop, worst=None, passed=False,
                          message=f"no student accuracy was measured on the {GATE_SPLIT} split, so the accuracy "
                                  f"gate cannot pass")
    passed = worst.drop <= max_accuracy_drop
    verdict = "within" if passed else "beyond"
    change = f"lost {worst.drop:.2f} points" if worst.drop >= 0 else f"gained {-worst.drop:.2f} points"
    message = (f"the {worst.model} on {worst.runtime} {change} of top-1 against the teacher "
               f"on the {worst.split} split ({worst.teacher_top1_pct:.2f}% -> {worst.top1_pct:.2f}%), {verdict} "
               f"the gate's {max_accuracy_drop:g} "
               f"point{'' if max_accuracy_drop == 1 else 's'} (gate.max_accuracy_drop)")
    return GateResult(max_accuracy_drop=max_accuracy_drop, worst=worst, passed=passed, message=message)


def raise_for_gate(report: Report) -> GateResult | None:
    """Raise ``GateFailedError`` (exit code 3) when the report's gate verdict failed; return the verdict
    (None when the run has no gate). Reads ``report.gate``; never evaluates the gate again."""
    result = report.gate
    if result is not None and not result.passed:
        raise GateFailedError(
            f"accuracy gate failed: {result.message}; the reports are written in {report.run_dir}",
            hint="recover accuracy (more distillation epochs, a smaller pruning ratio, keep sensitive layers in "
                 "float) or raise gate.max_accuracy_drop")
    return result
