"""``report.html``: one self-contained file (inline CSS, plots as base64 PNG), safe to mail or attach."""

from __future__ import annotations

from html import escape

from edgekd.report.markdown import summary_lines
from edgekd.report.plots import all_plots
from edgekd.report.schema import Report
from edgekd.report.tables import Table, all_tables, machine_rows

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;
padding:0 1rem;line-height:1.4}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.82rem;margin:.4rem 0}th,td{border:1px solid #ddd;padding:3px 7px;
text-align:right;vertical-align:top}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.caption{color:#666;font-size:.8rem;font-style:italic}.meta{color:#555;font-size:.85rem}
.pass{color:#1a7f37;font-weight:600}.fail{color:#c62828;font-weight:600}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.85rem}
"""


def _table_html(table: Table) -> str:
    parts = [f"<h2>{escape(table.title)}</h2>"]
    if table.caption:
        parts.append(f'<p class="caption">{escape(table.caption)}</p>')
    if not table.rows:
        parts.append("<p>(nothing measured)</p>")
        return "\n".join(parts)
    parts.append("<table><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in table.headers) + "</tr></thead>")
    parts.append("<tbody>" + "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>"
                                     for row in table.rows) + "</tbody></table>")
    return "\n".join(parts)


def _summary_html(report: Report) -> str:
    items = []
    for line in summary_lines(report):
        text = escape(line.lstrip("- ").replace("**", ""))
        if report.gate is not None and text.startswith("Gate"):
            css = "pass" if report.gate.passed else "fail"
            text = f'<span class="{css}">{text}</span>'
        items.append(f"<li>{text}</li>")
    return f"<ul>{''.join(items)}</ul>" if items else ""


def _figure_html(plot) -> str:
    return (f'<figure><img alt="{escape(plot.title)}" src="{plot.data_uri()}"><figcaption>{escape(plot.title)}'
            f"</figcaption></figure>")


def render_html(report: Report) -> str:
    # top-down as report.md: the tables in order, each plot once, under the first table whose numbers it draws
    # (plots with no such table, e.g. a run without one, follow the summary)
    pending, parts = all_plots(report), []
    for table in all_tables(report):
        parts.append(_table_html(table))
        here = [p for p in pending if p.follows and table.title.startswith(p.follows)]
        parts += [_figure_html(p) for p in here]
        pending = [p for p in pending if p not in here]
    plots = "\n".join(_figure_html(p) for p in pending)
    tables = "\n".join(parts)
    machine = "<h2>Machine</h2><table><tbody>" + "".join(
        f"<tr><th>{escape(k)}</th><td style='text-align:left'>{escape(v)}</td></tr>" for k, v in machine_rows(report)
    ) + "</tbody></table>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>edgekd report: {escape(report.name)}</title>
<style>{_CSS}</style></head><body>
<h1>edgekd report: {escape(report.name)}</h1>
<p class="meta">Machine: {escape(report.machine_summary)}<br>
Run <code>{escape(report.run_dir)}</code>, created {escape(report.created or '?')}, seed {report.seed},
recipe hash <code>{escape((report.recipe_hash or '')[:12])}</code><br>
Report schema {escape(report.schema_version)}, generated {escape(report.generated)}</p>
{_summary_html(report)}
{plots}
{tables}
{machine}
</body></html>
"""
