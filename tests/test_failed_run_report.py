"""A run that stops at a failed stage still writes its report, for the stages that finished.

The report is where a user sees why a stage failed (the prune section's widths and alive check explain a
dead student), so the runner writes report.md/html/json before the error leaves it; the exit code and
the error stay the stage's own. Real parts only: scikit-learn digits, real training and torch-pruning.
"""

from __future__ import annotations

import json

import pytest

import edgekd
from edgekd.errors import EdgekdError


def _dead_student_recipe() -> dict:
    # a fresh (untrained) MLP student distilled at a vanishing lr stays at chance, so the distill stage's
    # alive check (or the divergence guard) stops the run after the prune stage finished
    return {
        "name": "dead", "seed": 0,
        "data": {"dataset": "digits", "image_size": 8, "batch_size": 64},
        "teacher": {"model": "mlp", "kwargs": {"hidden": 32},
                    "train": {"epochs": 3, "optimizer": "adamw", "lr": 0.01}},
        "student": {"model": "mlp", "kwargs": {"hidden": 16}},
        "stages": [{"prune": {"ratio": 0.25, "probe": None}},
                   {"distill": {"epochs": 1, "lr": 1e-9}}],
        # a gate the pruned student's ledger accuracy would pass: a run that stopped must not
        "gate": {"max_accuracy_drop": 100.0},
    }


def test_a_run_that_fails_a_stage_writes_the_report_of_what_finished(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(EdgekdError) as failure:
        edgekd.compress(_dead_student_recipe(), out=out, quiet=True)
    assert failure.value.exit_code == 1  # a failed stage, not bad input: the code stays the stage's
    manifest = json.loads((out / "manifest.json").read_text())
    status = {s["key"]: s["status"] for s in manifest["stages"]}
    assert status == {"teacher": "done", "0-prune": "done", "1-distill": "failed"}
    markdown = (out / "report.md").read_text()
    # the failed stage and its message are in the summary at the top, before the tables
    head = markdown.split("\n## ", 1)[0]
    assert "1-distill failed" in head
    # first of all: the figures under it describe the student before the stage that failed
    assert head.split("\n- ", 1)[1].startswith("Stage **1-distill failed**")
    first_line_of_error = manifest["stages"][2]["error"].splitlines()[0]
    assert first_line_of_error[:60] in head
    # the stages that finished are reported: the prune stage's section is there
    report = json.loads((out / "report.json").read_text())
    assert [s["key"] for s in report["stages"] if s["status"] == "failed"] == ["1-distill"]
    assert "0-prune" in report["stage_data"]
    assert (out / "report.html").is_file() and "1-distill" in (out / "report.html").read_text()
    # a run that stopped cannot pass its gate, whatever the earlier student's accuracy
    assert report["gate"]["passed"] is False and "1-distill" in report["gate"]["message"]
    # earlier artifacts stay intact
    assert (out / "student" / "after-0-prune.pt").is_file() and (out / "teacher" / "teacher.pt").is_file()
