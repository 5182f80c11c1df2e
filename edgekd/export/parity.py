"""Parity of an exported artifact with the PyTorch model it came from, on real inputs.

Each output is compared by its largest and mean absolute difference and by top-1 agreement
(the fraction of samples whose arg-max class matches). A failure raises ``ParityError``
carrying every output's numbers, so the message says how far off the artifact is, not only
that it is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from edgekd.errors import ParityError
from edgekd.export.prepare import eval_on_cpu
from edgekd.models.evaluate import predict_logits
from edgekd.runtimes.base import LoadedModel


def compare_logits(reference: np.ndarray, candidate: np.ndarray, *, name: str = "logits") -> dict[str, Any]:
    """Max/mean absolute difference and top-1 agreement of two (N, classes) arrays."""
    if reference.shape != candidate.shape:
        return {"output": name, "shape_reference": list(reference.shape), "shape_artifact": list(candidate.shape),
                "max_abs_diff": None, "mean_abs_diff": None, "top1_agreement": 0.0}
    finite = bool(np.isfinite(candidate).all())
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    agree = float((reference.argmax(axis=1) == candidate.argmax(axis=1)).mean()) if len(reference) else 1.0
    return {
        "output": name,
        "max_abs_diff": float(diff.max()) if finite and diff.size else (None if not finite else 0.0),
        "mean_abs_diff": float(diff.mean()) if finite and diff.size else (None if not finite else 0.0),
        "top1_agreement": agree,
        "finite": finite,
    }


def _describe(row: dict[str, Any], atol: float, min_top1: float) -> str:
    if "shape_reference" in row:
        return f"{row['output']}: shape {tuple(row['shape_artifact'])} but PyTorch gives {tuple(row['shape_reference'])}"
    if not row["finite"]:
        return f"{row['output']}: the artifact returned NaN or infinite values"
    return (f"{row['output']}: max abs diff {row['max_abs_diff']:.3g} (atol {atol:g}), mean abs diff "
            f"{row['mean_abs_diff']:.3g}, top-1 agreement {100 * row['top1_agreement']:.2f}% "
            f"(min {100 * min_top1:.2f}%)")


def check_parity(reference: nn.Module, loaded: LoadedModel, inputs: torch.Tensor, *, atol: float,
                 min_top1_agreement: float, label: str, batch_size: int = 64) -> dict[str, Any]:
    """Run ``inputs`` through the PyTorch ``reference`` and the ``loaded`` artifact and compare.

    Returns the numbers (samples, per-output rows, tolerances, ``passed``); raises
    ``ParityError`` (with ``outputs`` = the per-output rows) when an output is off.
    """
    inputs = inputs.detach().cpu().float().contiguous()
    with eval_on_cpu(reference) as ref, torch.no_grad():
        expected = predict_logits(ref, inputs, batch_size=batch_size, device=torch.device("cpu")).numpy()
    got = loaded.run_in_batches(inputs.numpy(), batch_size)
    row = compare_logits(expected, got)
    passed = ("shape_reference" not in row and row["finite"] and row["max_abs_diff"] <= atol
              and row["top1_agreement"] >= min_top1_agreement)
    result = {"label": label, "runtime": loaded.runtime, "samples": int(len(inputs)), "atol": atol,
              "min_top1_agreement": min_top1_agreement, "outputs": [row], "passed": bool(passed),
              "max_abs_diff": row["max_abs_diff"], "mean_abs_diff": row["mean_abs_diff"],
              "top1_agreement": row["top1_agreement"]}
    if not passed:
        raise ParityError(
            f"{label} disagrees with PyTorch on {len(inputs)} validation samples ({loaded.runtime}):\n  "
            + _describe(row, atol, min_top1_agreement),
            outputs=[row],
            hint="if the differences are float rounding, loosen export.verify.atol; large ones mean the export "
                 "changed the model (a layer in training mode, an unsupported op)")
    return result
