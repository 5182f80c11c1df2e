"""Where the deployed student's time goes: ONNX Runtime's own profiler, time per operator type.

``SessionOptions.enable_profiling`` makes ONNX Runtime write a Chrome-trace JSON with one event
per node execution; events of category ``Node`` named ``<node>_kernel_time`` carry the kernel's
duration (microseconds) and its ``op_name``. Summed per operator type over the profiled calls and
divided by the number of calls, they say which operators a further speed-up has to come from
(convolutions, a QuantizeLinear at every INT8 boundary, a Transpose the exporter left behind).
The profiled session runs apart from the timed ones (profiling adds overhead), with the thread
count and batch of the benchmark's setting it names.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field


class OpTime(BaseModel):
    op_type: str
    nodes: int = Field(..., description="nodes of this type that ran")
    ms_per_call: float = Field(..., description="summed kernel time per call (one batch), milliseconds")
    share: float = Field(..., description="fraction of all kernel time")


class OpProfile(BaseModel):
    """Kernel time per operator type of one ONNX model on ONNX Runtime's CPU provider."""

    runtime: str = "onnxruntime"
    model: str = Field(..., description="benchmark label of the profiled model (student, student-int8)")
    path: str
    threads: int
    batch_size: int
    calls: int = Field(..., description="profiled calls, after one unprofiled warm-up call")
    kernel_ms_per_call: float = Field(..., description="all kernel time per call, milliseconds")
    ops: list[OpTime] = Field(default_factory=list, description="largest share first")


def profile_onnx(path: Path, batch: np.ndarray, *, threads: int, calls: int = 20, label: str = "student",
                 shown_path: str | None = None) -> OpProfile:
    """Run ``path`` ``calls`` times on ``batch`` with ONNX Runtime's profiler on and sum kernel time per op type.

    Raises ``onnxruntime`` errors for a file that does not load or run (the caller records them)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    with tempfile.TemporaryDirectory(prefix="edgekd-profile-") as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: np.ascontiguousarray(batch, dtype=np.float32)}
        session.run(None, feed)  # the first call allocates: profiled, but left out below
        for _ in range(calls):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    # the warm-up call's node events end before the second model_run starts
    start = runs[1]["ts"] if len(runs) > 1 else 0
    per_op: dict[str, list[float]] = {}
    nodes: dict[str, set[str]] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time") or e.get("ts", 0) < start:
            continue
        op = (e.get("args") or {}).get("op_name", "?")
        per_op.setdefault(op, []).append(float(e.get("dur", 0)))
        nodes.setdefault(op, set()).add(e["name"])
    total_us = sum(sum(v) for v in per_op.values())
    ops = [OpTime(op_type=op, nodes=len(nodes[op]), ms_per_call=sum(v) / calls / 1e3,
                  share=sum(v) / total_us if total_us else 0.0) for op, v in per_op.items()]
    ops.sort(key=lambda o: -o.ms_per_call)
    return OpProfile(model=label, path=shown_path or str(path), threads=threads, batch_size=len(batch),
                     calls=calls, kernel_ms_per_call=total_us / calls / 1e3, ops=ops)
