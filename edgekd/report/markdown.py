"""``report.md``: the report as Markdown tables (for a pull request, a wiki, a chat message)."""

from __future__ import annotations

from edgekd.report.schema import Report
from edgekd.report.tables import Table, all_tables, machine_rows, quantize_outcomes
from edgekd.train.events import guard_event_text


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


def teacher_guard_lines(report: Report) -> list[str]:
    """One line when the divergence guard acted during the teacher's training (rollbacks, BatchNorm
    re-estimation): the teacher the student learns from was not trained as the recipe's lr alone says."""
    events = (report.teacher or {}).get("guard_events") or []
    if not events:
        return []
    return [f"- Teacher training: the divergence guard acted {len(events)} time(s): "
            + "; ".join(guard_event_text(e) for e in events) + "."]


def summary_lines(report: Report) -> list[str]:
    """The verdicts at the top: gate, worst accuracy drop, notes, failed stages."""
    # a stopped run says so first: the figures below it describe the student before the failed stage
    failed = report.failed_stages()
    lines = [f"- Stage **{s.key} failed**: {s.error}" for s in failed]
    lines += teacher_guard_lines(report)
    if report.gate is not None:
        lines.append(f"- **Gate {'passed' if report.gate.passed else 'FAILED'}**: {report.gate.message}.")
    worst = report.worst_drop()
    if worst is not None and report.gate is None and not failed:
        lines.append(f"- Largest accuracy drop: {worst.model} on {worst.runtime}, {worst.drop:.2f} points "
                     f"on the {worst.split} split ({worst.teacher_top1_pct:.2f}% → {worst.top1_pct:.2f}%; "
                     f"{worst.basis}).")
    lines += deployed_lines(report)
    lines += slower_int8_lines(report)
    if report.accuracy_splits:
        splits = report.accuracy_splits
        bench = splits.get("benchmark.accuracy")
        where = (f"benchmark on {bench}, gate on {splits.get('gate', 'test')}" if bench is not None
                 else f"gate on {splits.get('gate', 'test')} (no benchmark ran)")
        lines.append(f"- Accuracy splits: {where}; test is held out from every decision; the ledger shows val "
                     f"(what decisions read) and test.")
    if report.benchmark is not None:
        lines += [f"- Note{f' ({n.runtime})' if n.runtime else ''}: {n.message}" for n in report.benchmark.notes]
        lines.append(f"- Timed inputs: {report.benchmark.timing_input}.")
    return lines


def deployed_lines(report: Report) -> list[str]:
    """One line: the range of the deployed students' measured speed-ups over the teacher (the table "What
    ships" has them per runtime and batch; the Teacher vs student table every setting)."""
    rows = []
    for runtime in dict.fromkeys(c.runtime for c in report.comparisons):
        # the INT8 student where the quantize stage shipped one for this runtime's format (and it was timed)
        timed = [c for c in report.comparisons if c.runtime == runtime and c.speedup is not None]
        label = "student-int8" if any(c.model == "student-int8" for c in timed) else "student"
        rows += [c for c in timed if c.model == label]
    if not rows:
        return []
    low, high = min(rows, key=lambda c: c.speedup), max(rows, key=lambda c: c.speedup)
    int8 = sorted({c.runtime for c in rows if c.model == "student-int8"})
    fp32 = sorted({c.runtime for c in rows} - set(int8))
    shipped = ", ".join(([f"INT8 on {', '.join(int8)}"] if int8 else []) + ([f"FP32 on {', '.join(fp32)}"] if fp32 else []))
    return [f"- **Deployed students** ({shipped}): {low.speedup:.2f}x ({low.runtime}, {low.threads}t, batch "
            f"{low.batch_size}) to {high.speedup:.2f}x ({high.runtime}, {high.threads}t, batch {high.batch_size}) "
            f"faster than the teacher, measured on each runtime (table 'What ships')."]


def slower_int8_lines(report: Report) -> list[str]:
    """A line per runtime where the shipped INT8 student timed slower than its FP32 twin at some batch size in
    the benchmark: the quantize stage decides at one batch size (``quantize.speed.batch_size``), and a model
    deployed at another should not learn the difference from its users."""
    decided = {o["runtime"]: o.get("batch_size") for o in quantize_outcomes(report)}
    by_setting = {(c.runtime, c.threads, c.batch_size, c.model): c for c in report.comparisons}
    slower: dict[str, list[str]] = {}
    for (runtime, threads, batch, model), int8 in by_setting.items():
        fp32 = by_setting.get((runtime, threads, batch, "student"))
        if model == "student-int8" and fp32 is not None and int8.p50_ms > fp32.p50_ms:
            slower.setdefault(runtime, []).append(
                f"{threads}t batch {batch}: {int8.p50_ms:.3f} vs {fp32.p50_ms:.3f} ms")
    lines = []
    for runtime, where in slower.items():
        batch = decided.get(runtime)
        basis = (f"the quantize stage chose it at batch {batch}" if batch is not None
                 else "the quantize stage chose it at another batch size")
        lines.append(f"- Note ({runtime}): the INT8 student is slower than the FP32 student at "
                     f"{'; '.join(where)} (p50); {basis} (quantize.speed.batch_size). Ship the FP32 file for that "
                     f"batch size, or set quantize.speed.batch_size to it.")
    return lines


def render_markdown(report: Report) -> str:
    head = [f"# edgekd report: {report.name}", "",
            f"Machine: {report.machine_summary}  ", f"Run: `{report.run_dir}`, created {report.created or '?'}, "
            f"seed {report.seed}, recipe hash `{(report.recipe_hash or '')[:12]}`  ",
            f"Report schema {report.schema_version}, generated {report.generated}", ""]
    lines = summary_lines(report)
    if lines:
        head += lines + [""]
    body = [markdown_table(t) for t in all_tables(report)]
    machine = ["## Machine", "", "| fact | value |", "|---|---|",
               *[f"| {_cell(k)} | {_cell(v)} |" for k, v in machine_rows(report)], ""]
    return "\n".join(head + body + machine)
