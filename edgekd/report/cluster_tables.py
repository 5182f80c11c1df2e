"""The ``cluster`` stage's report table: every clustered layer, its distinct values and packed size.

Reads one cluster stage's report data (``edgekd.cluster.stage``: ``layers`` rows, the shipped ONNX
file's sizes ``before``/``after``); a field a run did not record renders as "—".
"""

from __future__ import annotations

from typing import Any

from edgekd.report.tables import Table, fmt_count, fmt_num


def _bytes(sizes: Any, key: str) -> str:
    return fmt_count(sizes.get(key)) if isinstance(sizes, dict) else "—"


def cluster_layers_table(cluster: Any, key: str | None = None) -> Table | None:
    """Per clustered layer: weights, distinct values after training, index bits, and the bytes of the weights
    as float32 against packed (indices of log2(k) bits + a float32 codebook); the caption gives the shipped
    ONNX file's bytes raw and gzipped (level 9) before and after, and val top-1 before, right after the
    k-means and after distillation. Units: bytes, percent."""
    if not isinstance(cluster, dict) or not cluster.get("layers"):
        return None
    title = "Weight sharing (cluster): layers" + (f" ({key})" if key else "")
    before, after = cluster.get("before"), cluster.get("after")
    caption = (f"k = {cluster.get('k', '?')} shared values per layer; ONNX file raw {_bytes(before, 'onnx_bytes')} -> "
               f"{_bytes(after, 'onnx_bytes')} bytes (the runtimes load float weights either way), gzip -9 "
               f"{_bytes(before, 'onnx_gzip_bytes')} -> {_bytes(after, 'onnx_gzip_bytes')} bytes "
               f"({fmt_num(cluster.get('gzip_ratio'), '.2f', 'x')} smaller); val top-1 "
               f"{fmt_num(cluster.get('val_accuracy_before'), '.2f', '%')} -> "
               f"{fmt_num(cluster.get('val_accuracy_clustered'), '.2f', '%')} clustered -> "
               f"{fmt_num(cluster.get('val_accuracy_after'), '.2f', '%')} after distillation")
    t = Table(title, ["layer", "type", "weights", "distinct values", "index bits", "float32 bytes", "packed bytes"],
              caption=caption)
    for row in cluster["layers"]:
        t.rows.append([str(row.get("layer", "?")), str(row.get("type", "")), fmt_count(row.get("weights")),
                       fmt_count(row.get("distinct")), fmt_count(row.get("index_bits")),
                       fmt_count(row.get("float_bytes")), fmt_count(row.get("packed_bytes"))])
    t.rows.append(["all", "", "", "", "", fmt_count(cluster.get("float_weight_bytes")),
                   fmt_count(cluster.get("packed_weight_bytes"))])
    return t
