"""The ``lowrank`` stage's report table: every factorizable layer, its shapes, scheme, rank and energy kept.

Reads one lowrank stage's report data (``edgekd.lowrank.stage``: ``layers`` rows, ``latency`` rows);
a field a run did not record renders as "—".
"""

from __future__ import annotations

from typing import Any

from edgekd.report.tables import Table, fmt_count, fmt_num


def lowrank_layers_table(lowrank: Any, key: str | None = None) -> Table | None:
    """Per layer: weight shape before and after, scheme, rank of the full rank, energy kept, params and MACs
    (one sample) before and after, or why the layer was left as it is; measured latency in the caption."""
    if not isinstance(lowrank, dict) or not lowrank.get("layers"):
        return None
    title = "Low-rank factorization: layers" + (f" ({key})" if key else "")
    speed = "; ".join(f"ONNX Runtime {r.get('threads')}t batch {r.get('batch_size')}: "
                      f"{fmt_num(r.get('speedup_vs_teacher'), '.2f', 'x')} vs teacher"
                      for r in lowrank.get("latency") or [])
    caption = (f"target {lowrank.get('target', '?')}, energy threshold {fmt_num(lowrank.get('energy'), '.4f')}, "
               f"round_to {lowrank.get('round_to')}; val top-1 {fmt_num(lowrank.get('val_accuracy_before'), '.2f', '%')}"
               f" -> {fmt_num(lowrank.get('val_accuracy_after'), '.2f', '%')} right after factorization"
               + (f"; measured: {speed}" if speed else ""))
    t = Table(title, ["layer", "type", "shape before", "shape after", "scheme", "rank", "energy kept", "params",
                      "MACs / sample", "left as is because"], caption=caption)
    for row in lowrank["layers"]:
        rank = f"{row['rank']} / {row.get('max_rank', '?')}" if row.get("rank") is not None else "—"
        energy = row.get("energy_kept")
        params = f"{fmt_count(row.get('params_before'))} -> {fmt_count(row.get('params_after'))}" \
            if row.get("params_after") is not None else fmt_count(row.get("params_before"))
        macs = f"{fmt_count(row.get('macs_before'))} -> {fmt_count(row.get('macs_after'))}" \
            if row.get("macs_after") is not None else fmt_count(row.get("macs_before"))
        t.rows.append([str(row.get("layer", "?")), str(row.get("type", "")), str(row.get("shape_before", "")),
                       str(row.get("shape_after") or "—"), str(row.get("scheme") or "—"), rank,
                       fmt_num(None if energy is None else 100 * energy, ".1f", "%"), params, macs,
                       str(row.get("skipped") or "")])
    return t
