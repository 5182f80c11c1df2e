"""``report.md``: the report as Markdown tables (for a pull request, a wiki, a chat message)."""

from __future__ import annotations

from edgekd.report.schema import Report
from edgekd.report.tables import Table, all_tables, machine_rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(table: Table) -> str:
    lines = [f"## {table.title}", ""]
    if table.caption:
        lines += [f"_{table.caption}_", ""]
    if not table.rows:
        return "\n".join(lines + ["(nothing measured)", ""])
    lines.append("| " + " | ".join(_cell(h) for h in table.headers) + " |")
    lines.append("|" + "|".join("---" for _ in table.headers) + "|")
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines + [""])


def summary_lines(report: Report) -> list[str]:
    """The verdicts at the top: gate, worst accuracy drop, notes, failed stages."""
    # a stopped run says so first: the figures below it describe the student before the failed stage
    failed = report.failed_stages()
    lines = [f"- Stage **{s.key} failed**: {s.error}" for s in failed]
    if report.gate is not None:
        lines.append(f"- **Gate {'passed' if report.gate.passed else 'FAILED'}**: {report.gate.message}.")
    worst = report.worst_drop()
    if worst is not None and report.gate is None and not failed:
        lines.append(f"- Largest accuracy drop: {worst.model} on {worst.runtime}, {worst.drop:.2f} points "
                     f"on the {worst.split} split ({worst.teacher_top1_pct:.2f}% → {worst.top1_pct:.2f}%; "
                     f"{worst.basis}).")
    lines += deployed_lines(report)
    if report.accuracy_splits:
        lines.append(f"- Accuracy splits: benchmark and gate on {report.accuracy_splits.get('benchmark.accuracy')} "
                     f"(held out from every decision); the ledger shows val (what decisions read) and test.")
    if report.benchmark is not None:
        lines += [f"- Note{f' ({n.runtime})' if n.runtime else ''}: {n.message}" for n in report.benchmark.notes]
        lines.append(f"- Timed inputs: {report.benchmark.timing_input}.")
    return lines


def deployed_lines(report: Report) -> list[str]:
    """Which student file ships, and its measured speed-ups: what a device team asks first."""
    label, path = report.deployed_student()
    rows = [c for c in report.comparisons if c.model == label and c.speedup is not None]
    if not rows:
        return []
    shipped = (f"`{path}`, INT8 shipped by the quantize stage" if label == "student-int8"
               else f"`{path}`, FP32" if path else "FP32")
    by_runtime: dict[str, list[str]] = {}
    for c in rows:
        by_runtime.setdefault(c.runtime, []).append(
            f"{c.speedup:.2f}x ({c.threads} thread{'s' if c.threads > 1 else ''}, batch {c.batch_size})")
    speed = "; ".join(f"on {runtime} {', '.join(cells)}" for runtime, cells in by_runtime.items())
    accuracy = next((f"; top-1 {c.top1_pct:.2f}% vs teacher {c.teacher_top1_pct:.2f}%" for c in rows
                     if c.top1_pct is not None and c.teacher_top1_pct is not None), "")
    return [f"- **Deployed student** ({shipped}): measured speed-up over the teacher {speed}{accuracy}."]


def speedup_lines(report: Report) -> list[str]:
    """One sentence per comparison, naming where the latency was measured."""
    return [f"- {c.model}: {c.speedup:.2f}x faster than the teacher, {c.setting} (p50 {c.teacher_p50_ms:.3f} → "
            f"{c.p50_ms:.3f} ms per batch)" for c in report.comparisons
            if c.speedup is not None and c.teacher_p50_ms is not None]


def render_markdown(report: Report) -> str:
    head = [f"# edgekd report: {report.name}", "",
            f"Machine: {report.machine_summary}  ", f"Run: `{report.run_dir}`, created {report.created or '?'}, "
            f"seed {report.seed}, recipe hash `{(report.recipe_hash or '')[:12]}`  ",
            f"Report schema {report.schema_version}, generated {report.generated}", ""]
    lines = summary_lines(report)
    if lines:
        head += lines + [""]
    speedups = speedup_lines(report)
    if speedups:
        head += ["## Speed-ups", "", *speedups, ""]
    body = [markdown_table(t) for t in all_tables(report)]
    machine = ["## Machine", "", "| fact | value |", "|---|---|",
               *[f"| {_cell(k)} | {_cell(v)} |" for k, v in machine_rows(report)], ""]
    return "\n".join(head + body + machine)
