"""Accuracy-aware fallback: keep the nodes that suffer most from INT8 in float.

Error measure: mean squared error between the INT8 model's logits and FP32's, on real
validation samples, on the target runtime.

Search: greedy forward selection. First every weighted node is scored alone (leave-one-out:
quantize everything except that node). Then nodes are kept in float one more at a time; each
step tries the ``beam`` best-scored remaining nodes *together with those already chosen* and
keeps the one that lowers the error most. Re-scoring in context matters: ONNX Runtime quantizes
a tensor when either its producer or its consumer is quantized, so an outlier activation is
only freed when both neighbours are float, and its consumer alone scores as useless. After each
step the top-1 drop is measured; the search stops when it is within tolerance, or after
``max_float_nodes``, returning the best model found either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import StageError
from edgekd.quantize.candidates import Bench, Candidate, measure_accuracy, runtime_logits
from edgekd.quantize.graph import fused_at_load

#: (nodes kept in float, output path) -> path of the quantized model
Requantize = Callable[[list[str], Path], Path]

#: remaining nodes re-scored per greedy step (in context of those already kept in float)
BEAM = 6


@dataclass
class SensitivityResult:
    target: str
    ranking: list[tuple[str, float]]
    trail: list[dict[str, Any]] = field(default_factory=list)
    best: Candidate | None = None
    met: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "met": self.met,
                "ranking": [{"node": n, "mse_reduction_alone": s} for n, s in self.ranking],
                "trail": self.trail, "best": self.best.name if self.best else None}


class _ErrorProbe:
    """Quantize with a set of float nodes and measure the logits' MSE against FP32."""

    def __init__(self, requantize: Requantize, bench: Bench, x: np.ndarray, fp32_logits: np.ndarray,
                 workdir: Path) -> None:
        self.requantize, self.bench, self.x, self.fp32_logits = requantize, bench, x, fp32_logits
        self.workdir = workdir
        self.calls = 0

    def __call__(self, excluded: list[str]) -> float | None:
        from edgekd.quantize.graph import NothingQuantizedError

        self.calls += 1
        try:
            path = self.requantize(excluded, self.workdir / "probe.onnx")
        except NothingQuantizedError:  # every weighted node in float: not a quantized model any more
            return None
        logits = runtime_logits(self.bench.load(path), self.x)
        return float(np.mean((logits - self.fp32_logits) ** 2))


def keep_sensitive_in_float(target: Candidate, nodes: list[str], requantize: Requantize, bench: Bench,
                            fp32: Candidate, fp32_path: Path, *, max_drop: float, max_float_nodes: int,
                            samples: int, workdir: Path, beam: int = BEAM) -> SensitivityResult:
    """Keep nodes in float, most harmful first, until ``max_drop`` holds (or return the best found)."""
    if not nodes:
        raise StageError("the accuracy-aware fallback found no Conv/Gemm/MatMul node to keep in float")
    workdir.mkdir(parents=True, exist_ok=True)
    x = np.ascontiguousarray(bench.x_val[:samples].numpy(), dtype=np.float32)
    probe = _ErrorProbe(requantize, bench, x, runtime_logits(bench.load(fp32_path), x), workdir)
    base = probe([])
    alone = {n: probe([n]) for n in nodes}
    scores = {n: (base - err if base is not None and err is not None else float("-inf")) for n, err in alone.items()}
    result = SensitivityResult(target=target.name,
                               ranking=[(n, round(s, 6)) for n, s in sorted(scores.items(), key=lambda i: -i[1])])
    excluded: list[str] = []
    best = target
    # at least one weighted node stays quantized, or there is nothing INT8 left to ship
    for k in range(1, min(max_float_nodes, len(nodes) - 1) + 1):
        remaining = sorted((n for n in nodes if n not in excluded), key=lambda n: -scores[n])
        if k == 1:
            pick, err = remaining[0], alone[remaining[0]]
        else:
            trials = {n: probe([*excluded, n]) for n in remaining[:beam]}
            trials = {n: e for n, e in trials.items() if e is not None}
            if not trials:
                break
            pick = min(trials, key=trials.get)
            err = trials[pick]
        excluded.append(pick)
        variant = Candidate(name=f"{target.name}+float{k}", precision="int8",
                            path=requantize(list(excluded), workdir / f"{target.name}.float{k}.onnx"),
                            settings=dict(target.settings), excluded_nodes=list(excluded))
        measure_accuracy(bench, variant)
        drop = variant.drop_from(fp32)
        # the file keeps these nodes in float; ONNX Runtime may fuse some back into integer kernels on load
        refused = fused_at_load(variant.path, variant.excluded_nodes) if bench.runtime == "onnxruntime" else []
        result.trail.append({"float_nodes": k, "added": pick, "logits_mse": err, "accuracy": variant.accuracy,
                             "accuracy_drop": None if drop is None else round(drop, 4), "error": variant.error,
                             "fused_at_load": refused})
        if variant.accuracy is not None and (best.accuracy is None or variant.accuracy > best.accuracy):
            best = variant
        if drop is not None and drop <= max_drop + 1e-9:
            result.met, best = True, variant
            break
    result.best = best if best is not target else None
    return result
