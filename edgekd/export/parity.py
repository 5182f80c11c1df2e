"""Parity of an exported artifact with the PyTorch model it came from, on real inputs, at the batch
sizes it will be run at.

Tolerances follow the output's scale. Float rounding grows with the size of the numbers a
network carries: a RegNet whose ONNX logits were up to 0.0117 off (mean 1.3e-05, top-1 agreement
100%) failed an absolute tolerance of 0.001 although nothing was wrong. So a sample passes when
its largest difference is within ``atol + rtol * (its largest |logit|)``; an export that changed
the model (a layer in training mode, a missing operator) is off by a sizeable fraction of the
logits, far beyond 1%. Beside max|Δ| the numbers carry the largest per-sample relative difference,
the cosine similarity (worst sample) and the SQNR in dB (signal power over difference power), so a
report can say how close "close" is.

The artifact is also run in single calls at the batch sizes it will meet (batch 1 on a phone, an
odd batch, the benchmark's sizes): a ``.pte`` can accept batches of 64 and refuse batch 1, or a
split that assumes an even batch can fail at odd ones. An artifact that cannot run a batch size
raises ``StageError`` naming it; one that runs but disagrees raises ``ParityError`` with every
number.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekd.errors import ParityError, StageError
from edgekd.export.prepare import eval_on_cpu
from edgekd.models.adapter import logits_of
from edgekd.models.evaluate import predict_logits
from edgekd.runtimes.base import LoadedModel
from edgekd.runtimes.native_log import filtered_native_stderr


def compare_logits(reference: np.ndarray, candidate: np.ndarray, *, name: str = "logits", atol: float = 0.0,
                   rtol: float = 0.0) -> dict[str, Any]:
    """Compare two (N, classes) arrays.

    Returns max/mean absolute difference, ``max_rel_diff`` (the largest per-sample max|Δ| over that
    sample's max|logit|), ``cosine_similarity`` (the worst sample's), ``sqnr_db`` (10·log10 of
    Σref² / ΣΔ²; None when identical), top-1 agreement, and ``within_tolerance``: every sample's
    max|Δ| ≤ atol + rtol · its max|logit|.
    """
    if reference.shape != candidate.shape:
        return {"output": name, "shape_reference": list(reference.shape), "shape_artifact": list(candidate.shape),
                "max_abs_diff": None, "mean_abs_diff": None, "top1_agreement": 0.0, "finite": True,
                "within_tolerance": False}
    finite = bool(np.isfinite(candidate).all())
    row: dict[str, Any] = {"output": name, "finite": finite}
    ref = reference.astype(np.float64).reshape(len(reference), -1)
    got = candidate.astype(np.float64).reshape(len(candidate), -1)
    row["top1_agreement"] = float((ref.argmax(axis=1) == got.argmax(axis=1)).mean()) if len(ref) else 1.0
    if not finite or ref.size == 0:
        row.update(max_abs_diff=None if not finite else 0.0, mean_abs_diff=None if not finite else 0.0,
                   max_rel_diff=None if not finite else 0.0, cosine_similarity=None, sqnr_db=None,
                   within_tolerance=finite)
        return row
    diff = np.abs(ref - got)
    per_sample_diff = diff.max(axis=1)
    scale = np.abs(ref).max(axis=1)
    rel = per_sample_diff / np.maximum(scale, np.finfo(np.float32).tiny)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    cosine = np.where(norms > 0, (ref * got).sum(axis=1) / np.maximum(norms, np.finfo(np.float64).tiny), 1.0)
    noise = float((diff ** 2).sum())
    row.update(
        max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()), max_rel_diff=float(rel.max()),
        cosine_similarity=float(cosine.min()),
        sqnr_db=round(10.0 * float(np.log10((ref ** 2).sum() / noise)), 2) if noise > 0 else None,
        within_tolerance=bool((per_sample_diff <= atol + rtol * scale).all()))
    return row


def _describe(row: dict[str, Any], atol: float, rtol: float, min_top1: float | None) -> str:
    if "shape_reference" in row:
        return f"{row['output']}: shape {tuple(row['shape_artifact'])} but PyTorch gives {tuple(row['shape_reference'])}"
    if not row["finite"]:
        return f"{row['output']}: the artifact returned NaN or infinite values"
    sqnr = f"{row['sqnr_db']:.1f} dB" if row.get("sqnr_db") is not None else "inf"
    top1 = f" (min {100 * min_top1:.2f}%)" if min_top1 is not None else ""
    return (f"{row['output']}: max abs diff {row['max_abs_diff']:.3g} (allowed: atol {atol:g} + rtol {rtol:g} x "
            f"each sample's largest |logit|; worst sample off by {100 * row['max_rel_diff']:.3g}% of it), mean abs "
            f"diff {row['mean_abs_diff']:.3g}, cosine {row['cosine_similarity']:.6f}, SQNR {sqnr}, "
            f"top-1 agreement {100 * row['top1_agreement']:.2f}%{top1}")


def _run_explained(loaded: LoadedModel, call):
    """``call()`` with native stderr captured: a runtime that fails explains itself on fd 2 (ExecuTorch:
    "Attempted to resize a static tensor. Expected shape (2, 32, 16, 16) ..."), so those lines go
    into the error instead of onto the terminal; after a success they are written out as usual."""
    native: list[str] = []
    try:
        with filtered_native_stderr(sink=native):
            result = call()
    except StageError as exc:
        if not native:
            raise
        raise StageError(f"{exc.message} (native log: {' | '.join(line.strip() for line in native)})",
                         hint=exc.hint) from exc
    if native:
        sys.stderr.write("\n".join(native) + "\n")
    return result


def _tile(inputs: torch.Tensor, batch: int) -> torch.Tensor:
    """The first ``batch`` samples, repeating the inputs when there are fewer."""
    reps = -(-batch // len(inputs))
    return (inputs.repeat(reps, *([1] * (inputs.dim() - 1))) if reps > 1 else inputs)[:batch].contiguous()


def check_batch_sizes(reference: nn.Module, loaded: LoadedModel, inputs: torch.Tensor, batch_sizes: Iterable[int],
                      *, atol: float, rtol: float, label: str,
                      declared_max_batch: int | None = None) -> list[dict[str, Any]]:
    """Run each batch size as ONE call of the artifact and of ``reference`` (eval mode, CPU) and compare.

    ``declared_max_batch``: the largest batch the export asked for (None: any). Batch sizes above it
    are recorded as skipped; one within it that the artifact's own ``max_batch`` refuses means the
    exporter narrowed the batch range (it specialised the batch axis), a ``StageError``. Raises
    ``StageError`` when the artifact fails at a batch size, ``ParityError`` when it runs but its
    shape or numbers differ. Returns one row per batch size (``batch``, ``max_abs_diff``, ...).
    """
    rows: list[dict[str, Any]] = []
    sizes = sorted({int(b) for b in batch_sizes if int(b) >= 1})
    narrowed = None
    if loaded.max_batch is not None and loaded.max_batch < (declared_max_batch or sys.maxsize):
        narrowed = (f"it accepts batches of at most {loaded.max_batch}"
                    + (f" although it was exported for up to {declared_max_batch}" if declared_max_batch else "")
                    + ": the exporter fixed the batch size (a split, chunk or reshape whose sizes were computed "
                    "from the example batch)")
        needed = [b for b in sizes if loaded.max_batch < b <= (declared_max_batch or sys.maxsize)]
        if needed:
            raise StageError(f"{label} cannot run batch {needed[0]} ({loaded.runtime}): {narrowed}",
                             hint="compute such sizes from x.shape at run time, or use a format that passed")
    for batch in sizes:
        if declared_max_batch is not None and batch > declared_max_batch:
            rows.append({"batch": batch, "skipped": f"above the largest batch exported for ({declared_max_batch})"})
            continue
        x = _tile(inputs, batch)
        with eval_on_cpu(reference) as ref, torch.no_grad():
            expected = logits_of(ref(x)).float().numpy()
        try:
            got = _run_explained(loaded, lambda x=x: loaded.run(x.numpy()))
        except StageError as exc:
            raise StageError(f"{label} fails at batch {batch} ({loaded.runtime}): {exc.message}"
                             + (f"; {narrowed}" if narrowed else ""),
                             hint="the artifact cannot run a batch size it will be used at; other formats are "
                             "unaffected" + (f" ({exc.hint})" if exc.hint else "")) from exc
        row = {"batch": batch, **compare_logits(expected, got, atol=atol, rtol=rtol)}
        rows.append(row)
        if not row["within_tolerance"]:
            raise ParityError(f"{label} disagrees with PyTorch at batch {batch} ({loaded.runtime}):\n  "
                              + _describe(row, atol, rtol, None), outputs=[row],
                              hint="the artifact behaves differently at this batch size (a squeeze, split or "
                              "reshape that depends on it)")
    return rows


def check_parity(reference: nn.Module, loaded: LoadedModel, inputs: torch.Tensor, *, atol: float,
                 min_top1_agreement: float, label: str, rtol: float = 0.0, batch_size: int = 64,
                 batch_sizes: Iterable[int] = (), declared_max_batch: int | None = None) -> dict[str, Any]:
    """Run ``inputs`` through the PyTorch ``reference`` and the ``loaded`` artifact and compare, then
    run each of ``batch_sizes`` as a single call (``check_batch_sizes``).

    Tolerances: see the module docstring (``rtol`` = 0 is a purely absolute check). Returns the
    numbers (samples, per-output rows, tolerances, per-batch rows, ``passed``); raises
    ``ParityError`` (with ``outputs`` = the per-output rows) when an output is off and
    ``StageError`` when the artifact cannot run one of ``batch_sizes``.
    """
    inputs = inputs.detach().cpu().float().contiguous()
    with eval_on_cpu(reference) as ref, torch.no_grad():
        expected = predict_logits(ref, inputs, batch_size=batch_size, device=torch.device("cpu")).numpy()
    got = _run_explained(loaded, lambda: loaded.run_in_batches(inputs.numpy(), batch_size))
    row = compare_logits(expected, got, atol=atol, rtol=rtol)
    passed = row["finite"] and row["within_tolerance"] and row["top1_agreement"] >= min_top1_agreement
    result = {"label": label, "runtime": loaded.runtime, "samples": int(len(inputs)), "atol": atol, "rtol": rtol,
              "min_top1_agreement": min_top1_agreement, "outputs": [row], "passed": bool(passed),
              **{k: row.get(k) for k in ("max_abs_diff", "mean_abs_diff", "max_rel_diff", "cosine_similarity",
                                         "sqnr_db", "top1_agreement")}}
    if not passed:
        raise ParityError(
            f"{label} disagrees with PyTorch on {len(inputs)} validation samples ({loaded.runtime}):\n  "
            + _describe(row, atol, rtol, min_top1_agreement),
            outputs=[row],
            hint="differences of a few percent of the logits mean the export changed the model (a layer in "
                 "training mode, an unsupported op); if they are float rounding, loosen export.verify.rtol "
                 "(relative to each sample's largest logit) or export.verify.atol")
    result["batches"] = check_batch_sizes(reference, loaded, inputs, batch_sizes, atol=atol, rtol=rtol, label=label,
                                          declared_max_batch=declared_max_batch)
    return result
