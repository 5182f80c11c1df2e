"""Accuracy of a model as a runtime runs it: top-1, agreement with the teacher, KL to the teacher.

Works on any runtime's ``LoadedModel`` (so INT8 and exported files are judged as deployed, not
as the PyTorch model they came from). The reference is the teacher's logits on the same
samples; top-1 agreement is the share of samples where student and teacher pick the same class,
and ``kl_mean`` is the mean over samples of KL(softmax(teacher) || softmax(student)) in nats,
the quantity logits distillation minimises (at temperature 1 here).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

from edgekd.runtimes.base import LoadedModel


class AccuracyMetrics(BaseModel):
    samples: int
    top1_pct: float | None = Field(None, description="top-1 accuracy in percent (None without labels)")
    agreement_pct: float | None = Field(None, description="percent of samples where the top-1 class matches "
                                                          "the teacher's (None without a reference)")
    kl_mean: float | None = Field(None, description="mean KL(teacher || model) in nats")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kl_divergence(reference_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per-sample KL(softmax(reference) || softmax(logits)) in nats, computed stably in float64."""
    if reference_logits.shape != logits.shape:
        raise ValueError(f"logits shaped {logits.shape} cannot be compared with the teacher's "
                         f"{reference_logits.shape}")
    log_p, log_q = log_softmax(reference_logits), log_softmax(logits)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=1)


def metrics_from_logits(logits: np.ndarray, labels: np.ndarray | None,
                        reference_logits: np.ndarray | None) -> AccuracyMetrics:
    pred = logits.argmax(axis=1)
    top1 = agreement = kl = None
    if labels is not None:
        top1 = float(100.0 * (pred == np.asarray(labels)).mean())
    if reference_logits is not None:
        agreement = float(100.0 * (pred == reference_logits.argmax(axis=1)).mean())
        kl = float(kl_divergence(reference_logits, logits).mean())
    return AccuracyMetrics(samples=int(len(logits)), top1_pct=top1, agreement_pct=agreement, kl_mean=kl)


def evaluate_loaded(model: LoadedModel, x: np.ndarray, labels: np.ndarray | None = None,
                    reference_logits: np.ndarray | None = None, *, batch_size: int = 64) -> tuple[AccuracyMetrics, np.ndarray]:
    """Run ``x`` through the loaded model (in batches) and score it; returns (metrics, logits)."""
    logits = model.run_in_batches(np.ascontiguousarray(x, dtype=np.float32), batch_size)
    return metrics_from_logits(logits, labels, reference_logits), logits
