"""Tables for what each stage decided: pruned widths, layers kept whole and why, prune steps,
distillation epochs, quantize candidates and exported files (parity, XNNPACK delegation).

They read ``Report.stage_data`` (each stage's own report dict, as written to report.json), so a
field a stage did not record renders as "—" and an older run still renders. A stage absent from
the run gives no table. Each stage entry of the recipe gets its own tables, titled with its
position ("Distillation epochs (3-distill)"), so a recipe that prunes and distills twice shows
both; a run from before position keys (data keyed "prune") renders untitled, as it did.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from edgekd.report.cluster_tables import cluster_layers_table
from edgekd.report.lowrank_tables import lowrank_layers_table
from edgekd.report.schema import Report
from edgekd.report.tables import Table, fmt_bytes, fmt_count, fmt_num

#: below this share of operators inside the XNNPACK delegate a .pte runs mostly on ExecuTorch's
#: portable (reference) kernels, typically 10-100x slower: the table flags it
LOW_DELEGATION = 0.9
#: rows of the per-layer INT8 error table (the worst; report.json has every tensor)
LAYER_ERROR_ROWS = 12


def _pct(v: Any) -> str:
    return fmt_num(v if isinstance(v, (int, float)) else None, ".2f", "%")


def _titled(title: str, key: str | None) -> str:
    return title if key is None else f"{title} ({key})"


def prune_layers_table(prune: Any, key: str | None = None) -> Table | None:
    """Every pruned layer's output width before and after, and every layer left whole with its reason.

    ``prune`` is one prune stage's report data; ``key`` its position ("0-prune"), shown in the title."""
    if not isinstance(prune, dict):
        return None
    reasons: dict[str, str] = {}
    for row in prune.get("kept_whole") or []:
        reasons[row.get("layer", "?")] = row.get("reason", "")
    for group in prune.get("groups_kept_whole") or []:
        for layer in group.get("layers") or []:
            reasons.setdefault(layer, group.get("reason", ""))
    t = Table(_titled("Pruning: output channels per layer", key), ["layer", "type", "before", "after", "kept", "left whole because"],
              caption=f"importance {prune.get('importance', '?')}, target {prune.get('target', '?')}, reached "
                      f"{prune.get('reached', '?')}; every prunable layer at full width is listed with its reason")
    seen = set()
    for row in prune.get("channels") or []:
        layer, before, after = row.get("layer", "?"), row.get("before"), row.get("after")
        seen.add(layer)
        kept = f"{100 * after / before:.0f}%" if before and after is not None else "—"
        t.rows.append([layer, str(row.get("type", "")), str(before), str(after), kept, reasons.get(layer, "")])
    for layer, reason in reasons.items():
        if layer not in seen:
            t.rows.append([layer, "", "", "", "100%", reason])
    return t


def prune_steps_table(prune: Any, key: str | None = None) -> Table | None:
    """Accuracy after each step of an iterative prune and after its short recovery."""
    steps = prune.get("steps") if isinstance(prune, dict) else None
    if not steps:
        return None
    caption = "val split; BatchNorm statistics recalibrated after each step"
    alive = prune.get("alive")
    if isinstance(alive, dict) and alive.get("alive") is False and alive.get("note"):
        # the check after pruning found the student at chance or not finite: say so where its accuracy is shown
        caption += f"; warning: {alive['note']}"
    t = Table(_titled("Pruning steps", key), ["step", "channel ratio", "params", "MACs / sample", "val top-1 after pruning",
                                "recovery", "val top-1 after recovery"], caption=caption)
    for s in steps:
        rec = s.get("recovery") or {}
        recovery = (f"{rec.get('epochs')} epoch(s) {rec.get('objective', '')}, lr {rec.get('lr')}"
                    + (f", {rec['rollbacks']} rollback(s)" if rec.get("rollbacks") else "")) if rec else "—"
        dead = " (not finite)" if s.get("finite") is False else " (chance)" if s.get("alive") is False else ""
        t.rows.append([str(s.get("step")), fmt_num(s.get("channel_ratio"), ".2f"), fmt_count(s.get("params")),
                       fmt_count(s.get("macs")), _pct(s.get("val_accuracy")) + dead, recovery,
                       _pct(rec.get("val_accuracy_after"))])
    return t


def _guard_text(event: dict[str, Any]) -> str:
    if event.get("action") == "rollback":
        return f"{event.get('reason')}: rolled back to epoch {event.get('to_epoch')}, lr x{event.get('lr_factor')}"
    if event.get("action") == "bn_recalibration":
        return (f"epoch {event.get('epoch')}: BatchNorm statistics re-estimated, val {_pct(event.get('val_before'))}"
                f" -> {_pct(event.get('val_after'))}")
    return ", ".join(f"{k} {v}" for k, v in event.items())


def distill_history_table(distill: Any, key: str | None = None) -> Table | None:
    """One row per recovery epoch, and the divergence guard's interventions."""
    if not isinstance(distill, dict) or not distill.get("history"):
        return None
    start = distill.get("val_at_start")
    events = distill.get("guard_events") or []
    rule = (distill.get("keep") or "best_val_accuracy").replace("_", " ")
    caption = (f"val split; the student started at {_pct(start)}; kept epoch {distill.get('best_epoch')} "
               f"(rule: {rule}, on val)")
    if events:
        caption += "; divergence guard: " + "; ".join(_guard_text(e) for e in events)
    t = Table(_titled("Distillation epochs", key), ["epoch", "lr", "train loss", "train top-1", "val loss", "val top-1"],
              caption=caption)
    for h in distill["history"]:
        t.rows.append([str(h.get("epoch")), fmt_num(h.get("lr"), ".2g"), fmt_num(h.get("train_loss"), ".4f"),
                       _pct(h.get("train_accuracy")), fmt_num(h.get("val_loss"), ".4f"), _pct(h.get("val_accuracy"))])
    return t


def quantize_candidates_table(quant: Any, key: str | None = None, title: str = "Quantization candidates"
                              ) -> Table | None:
    """Every INT8 candidate tried, its accuracy, measured latency, the nodes kept in float and the decision."""
    if not isinstance(quant, dict) or not quant.get("candidates"):
        return None
    fp32 = quant.get("fp32") or {}
    notes = "; ".join(str(n) for n in quant.get("notes") or [])
    t = Table(_titled(title, key), ["candidate", "precision", "val top-1", "drop", "p50 ms", "iters", "vs FP32",
                                    "size", "kept in float", "decision"],
              caption=f"timed on {quant.get('runtime', '?')}, {quant.get('threads', '?')} thread(s), batch "
                      f"{quant.get('batch_size', '?')}, against the FP32 {quant.get('format', '?')} file on the same "
                      f"runtime (FP32 {_pct(fp32.get('accuracy'))}, {fmt_num(fp32.get('latency_ms'), '.3f')} ms, "
                      f"{(fp32.get('latency') or {}).get('iters', '?')} timed calls); {quant.get('reason', '')}"
                      + (f". Notes: {notes}" if notes else ""))
    for c in quant["candidates"]:
        decision = c.get("decision") or ""
        if c.get("error"):
            decision = f"failed: {c['error']}"
        # the accuracy-aware fallback's candidates name the layers (ONNX nodes) it left in float
        kept = ", ".join(c.get("excluded_nodes") or []) or "—"
        iters = (c.get("latency") or {}).get("iters")
        t.rows.append([str(c.get("name")), str(c.get("precision", "")), _pct(c.get("accuracy")),
                       fmt_num(c.get("accuracy_drop"), ".2f"), fmt_num(c.get("latency_ms"), ".3f"),
                       "—" if iters is None else str(iters),
                       fmt_num(c.get("speedup_vs_fp32"), ".2f", "x"), fmt_bytes(c.get("size_bytes")), kept, decision])
    return t


def quantize_fallback_table(quant: Any, key: str | None = None) -> Table | None:
    """The accuracy-aware fallback's trail: nodes put back in float one at a time, most harmful first (ranked
    by how much keeping each alone in float cuts the logits' MSE against FP32), with what each step gave."""
    sens = quant.get("sensitivity") if isinstance(quant, dict) else None
    if not isinstance(sens, dict) or not sens.get("trail"):
        return None
    ranked = sens.get("ranking") or []
    ranking = ", ".join(f"{r.get('node')} ({fmt_num(r.get('mse_reduction_alone'), '.4f')})" for r in ranked[:8])
    if len(ranked) > 8:
        ranking += f" (first 8 of {len(ranked)})"
    t = Table(_titled(f"INT8 accuracy fallback: layers kept in float ({quant.get('format', '?')})", key),
              ["float nodes", "added", "logits MSE vs FP32", "val top-1", "drop", "fused back on load"],
              caption=f"repairing {sens.get('target', '?')}; {'met' if sens.get('met') else 'did not meet'} the "
                      f"tolerance; best: {sens.get('best') or 'none'}. Ranking (logits-MSE cut when kept in float "
                      f"alone; '—': not measurable): {ranking or '—'}. Nodes are the ONNX graph's; only nodes with weights (Conv, "
                      f"Gemm, MatMul) are tried")
    for step in sens["trail"]:
        t.rows.append([str(step.get("float_nodes")), str(step.get("added")), fmt_num(step.get("logits_mse"), ".4f"),
                       _pct(step.get("accuracy")),
                       f"failed: {step['error']}" if step.get("error") else fmt_num(step.get("accuracy_drop"), ".2f"),
                       ", ".join(step.get("fused_at_load") or []) or "—"])
    if any(step.get("fused_at_load") for step in sens["trail"]):
        t.caption += ("; ONNX Runtime fused some nodes kept in float back into integer kernels when it loaded the "
                      "file (last column): those do not run in float, whatever the file says")
    return t


def layer_error_table(quant: Any, key: str | None = None) -> Table | None:
    """Per-layer error of an INT8 ONNX graph against FP32 (ONNX Runtime's QDQ debugging tools), worst first."""
    data = quant.get("layer_error") if isinstance(quant, dict) else None
    if not isinstance(data, dict):
        return None
    if not data.get("rows"):  # say why there is no table: a reader looking for one should not have to guess
        reason = data.get("error") or "no rows"
        return Table(_titled(f"INT8 error per layer: {data.get('candidate', '?')} against FP32", key), ["why not"],
                     [[str(reason)]], caption="onnxruntime.quantization.qdq_loss_debug could not be run on it")
    # where the error grows most first (older reports without the drop: lowest accumulated SQNR first)
    rows = sorted(data["rows"], key=lambda r: (r.get("sqnr_drop_db") is None, -(r.get("sqnr_drop_db") or 0.0),
                                               r.get("xmodel_sqnr_db") is None, r.get("xmodel_sqnr_db") or 0.0))
    shown = rows[:LAYER_ERROR_ROWS]
    t = Table(_titled(f"INT8 error per layer: {data.get('candidate', '?')} against FP32", key),
              ["tensor", "made by", "op", "SQNR lost here (dB)", "SQNR vs FP32 (dB)", "SQNR of its own Q/DQ (dB)"],
              caption=f"onnxruntime.quantization.qdq_loss_debug on {data.get('samples', '?')} val samples; SQNR: "
                      f"signal-to-quantization-noise ratio, higher is better (6 dB ≈ 1 bit); 'vs FP32' is the "
                      f"error accumulated up to this tensor, 'lost here' how far it falls below the worst of the "
                      f"node's inputs (the layers where accuracy goes come first), 'own Q/DQ' the error its "
                      f"quantization alone adds (a folded Relu/Clip applied first); worst {len(shown)} of "
                      f"{len(rows)} tensors" + (f". {data['note']}" if data.get("note") else ""))
    for r in shown:
        t.rows.append([str(r.get("tensor")), str(r.get("node")), str(r.get("op_type")),
                       fmt_num(r.get("sqnr_drop_db"), ".1f"), fmt_num(r.get("xmodel_sqnr_db"), ".1f"),
                       fmt_num(r.get("qdq_sqnr_db"), ".1f")])
    return t


def quantize_other_formats_tables(quant: Any, key: str | None = None) -> list[Table]:
    """The candidates of each method under ``also`` (one per file format, e.g. the XNNPACK INT8 .pte)."""
    others = quant.get("also") if isinstance(quant, dict) else None
    tables = []
    for other in others or []:
        if isinstance(other, dict):
            title = f"Quantization candidates, .{other.get('format', '?')} on {other.get('runtime', '?')}"
            table = quantize_candidates_table(other, key, title)
            if table is not None:
                tables.append(table)
    return tables


def export_files_table(export: Any, key: str | None = None) -> Table | None:
    """Each exported file: parity against PyTorch and, for .pte, the share delegated to XNNPACK."""
    if not isinstance(export, dict) or not export.get("artifacts"):
        return None
    t = Table(_titled("Exported files", key), ["role", "format", "file", "status", "size", "max |Δ|", "cosine", "SQNR dB",
                                 "top-1 agree", "batches checked", "XNNPACK share"],
              caption=f"parity on {export.get('parity_samples', '?')} real samples against the PyTorch model; "
                      f"XNNPACK share: operators inside the delegate (below {LOW_DELEGATION:.0%} the rest run on "
                      "ExecuTorch's portable kernels, much slower)")
    for a in export["artifacts"]:
        share = a.get("delegated_share")
        share_text = "—" if share is None else f"{100 * share:.1f}%" + (" LOW" if share < LOW_DELEGATION else "")
        status = a.get("status", "?") if a.get("status") == "ok" else f"{a.get('status')}: {a.get('error', '')}"
        agree = a.get("top1_agreement")
        t.rows.append([str(a.get("role")), str(a.get("fmt")), str(a.get("path", "")), status,
                       fmt_bytes(a.get("file_bytes")), fmt_num(a.get("max_abs_diff"), ".2e"),
                       fmt_num(a.get("cosine_similarity"), ".6f"), fmt_num(a.get("sqnr_db"), ".1f"),
                       _pct(None if agree is None else 100 * agree),
                       ", ".join(str(b) for b in a.get("batches_checked") or []) or "—", share_text])
        if a.get("codebook_file"):  # shared weights (cluster stage) written beside the .onnx as index + codebook
            t.rows.append([str(a.get("role")), f"{a.get('fmt')}, index + codebook",
                           str(PurePosixPath(str(a.get("path", ""))).with_name(str(a["codebook_file"]))),
                           f"ok: {a.get('codebook_layers', '?')} shared weight tensor(s) as uint8 index + codebook, "
                           "the same outputs in ONNX Runtime", fmt_bytes(a.get("codebook_bytes")),
                           "—", "—", "—", "—", "—", "—"])
    return t


#: the tables of each stage name, from that stage's report data and position key
MAKERS: dict[str, tuple[Callable[[Any, str | None], Table | list[Table] | None], ...]] = {
    "prune": (prune_layers_table, prune_steps_table),
    "distill": (distill_history_table,),
    "export": (export_files_table,),
    "quantize": (quantize_candidates_table, quantize_fallback_table, layer_error_table, quantize_other_formats_tables),
    "lowrank": (lowrank_layers_table,),
    "cluster": (cluster_layers_table,),
}


def stage_tables(report: Report) -> list[Table]:
    """The stage-detail tables present in this report: each stage entry's, in run order.

    An entry filed by position gets its key in the titles; one filed by bare name (a run from
    before position keys) keeps the plain title and comes after, in pipeline order."""
    by_position: list[tuple[int, Table]] = []
    legacy: list[Table] = []
    order = {s.key: i for i, s in enumerate(report.stages)}
    for name, makers in MAKERS.items():
        for key, data in report.stage_entries(name):
            positioned = key != name
            for make in makers:
                made = make(data, key if positioned else None)
                for table in made if isinstance(made, list) else [made] if made is not None else []:
                    if positioned:
                        by_position.append((order.get(key, len(order)), table))
                    else:
                        legacy.append(table)
    by_position.sort(key=lambda item: item[0])  # stable: a stage's own tables keep their order
    return [t for _, t in by_position] + legacy
