"""``edgekd report RUN_DIR``: build and write the report files again from the run directory."""

from __future__ import annotations

from pathlib import Path

from edgekd.report.build import write_all_reports
from edgekd.report.schema import Report


def render_report(run_dir: Path) -> Report:
    """Rewrite ``report.json``, ``report.md`` and ``report.html`` in ``run_dir``; return the report.

    Only reads files (manifest, benchmark, recipe), so it works on a finished, failed or copied run.
    The caller prints ``edgekd.report.summary.print_summary(report)``; the gate is not applied here.
    """
    return write_all_reports(Path(run_dir))
