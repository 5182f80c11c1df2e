"""Training splits with labels withheld: the ``transfer`` source of the ``distill`` and ``finetune`` stages.

Distillation needs no labels for its soft term, so a teacher trained elsewhere (on more, or
other, labeled data) can teach a student on inputs nobody labeled. ``keep_labels`` models that
regime on a labeled dataset: a stratified share of the training split keeps its labels, the rest
become inputs only (label -1, which ``masked_cross_entropy`` and the trainer's accuracy skip).
``labeled_only`` is what plain fine-tuning can use of it: the labeled share alone.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.data import TensorDataset

from edgekd.data.bundle import DataBundle
from edgekd.errors import DataError

#: the label of an input without one
UNLABELED = -1


def keep_labels(data: DataBundle, fraction: float, seed: int) -> DataBundle:
    """A copy of ``data`` whose training split keeps the labels of a stratified ``fraction`` of its samples
    (at least one per class, chosen by ``seed``) and marks the others ``UNLABELED``. Val and test keep
    theirs. Raises ``DataError`` for a fraction outside (0, 1]."""
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"labeled_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return data
    from edgekd.data import stratified_splits

    y = data.train_y.cpu().numpy()
    _, kept = stratified_splits(y, (fraction,), seed)
    labels = torch.full_like(data.train_y, UNLABELED)
    index = torch.as_tensor(kept, dtype=torch.long)
    labels[index] = data.train_y[index]
    return dataclasses.replace(data, train=TensorDataset(data.train_x, labels))


def labeled_only(data: DataBundle) -> DataBundle:
    """A copy of ``data`` whose training split holds only its labeled samples."""
    known = data.train_y >= 0
    if bool(known.all()):
        return data
    if not bool(known.any()):
        raise DataError("the training split has no labeled sample to train on")
    return dataclasses.replace(data, train=TensorDataset(data.train_x[known].contiguous(), data.train_y[known]))


def label_counts(data: DataBundle) -> dict[str, int]:
    """{"labeled": n, "unlabeled": m} of the training split."""
    known = int((data.train_y >= 0).sum().item())
    return {"labeled": known, "unlabeled": len(data.train) - known}


__all__ = ["UNLABELED", "keep_labels", "label_counts", "labeled_only"]
