"""The table printed at the end of a run (and by ``edgekd report``): teacher vs student per setting."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table as RichTable

from edgekd.report.schema import Report
from edgekd.report.tables import Table, fmt_ms, fmt_num


def _rich(table: Table) -> RichTable:
    out = RichTable(title=table.title, caption=table.caption or None, caption_justify="left", title_justify="left")
    for i, header in enumerate(table.headers):
        out.add_column(header, justify="left" if i == 0 else "right", overflow="fold")
    for row in table.rows:
        out.add_row(*row)
    return out


def compact_table(report: Report) -> Table:
    """Teacher vs student in few columns, readable in an 80-column terminal."""
    t = Table("Teacher vs student: measured p50 latency per batch (ms), top-1 (%)",
              ["runtime", "thr×bs", "model", "teacher", "model", "speed-up", "top-1 T→model"])
    for c in report.comparisons:
        t.rows.append([c.runtime, f"{c.threads}×{c.batch_size}", c.model, fmt_ms(c.teacher_p50_ms), fmt_ms(c.p50_ms),
                       fmt_num(c.speedup, ".2f", "x"),
                       f"{fmt_num(c.teacher_top1_pct, '.1f')}→{fmt_num(c.top1_pct, '.1f')}"])
    return t


def print_summary(report: Report, console: Console | None = None) -> None:
    """Headline comparison, notes and the gate's verdict."""
    console = console or Console()
    console.print(f"[bold]edgekd report[/] {report.name}: {report.machine_summary}", highlight=False)
    headline = compact_table(report)
    if headline.rows:
        console.print(_rich(headline))
    else:
        console.print("no benchmark in this run (add a `benchmark:` section to the recipe)")
    if report.benchmark is not None:
        for note in report.benchmark.notes:
            console.print(f"[yellow]note[/] {note.message}", highlight=False)
    for stage in report.failed_stages():
        console.print(f"[red]stage {stage.key} failed:[/] {stage.error}", highlight=False)
    if report.gate is not None:
        verdict = "[green]passed[/]" if report.gate.passed else "[red]FAILED[/]"
        console.print(f"gate {verdict}: {report.gate.message}", highlight=False)
    console.print(f"reports: {report.run_dir}/report.html, report.md, report.json", highlight=False)
