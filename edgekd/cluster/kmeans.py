"""1-D k-means of a layer's weights and the weight sharing that keeps it through training.

Deep Compression (Han et al. 2016) shares weights per layer: k centroids initialised linearly
between the smallest and largest weight (the init that kept large weights best in their study),
Lloyd iterations, then fine-tuning where each centroid moves by the mean gradient of its weights.
In 1-D the nearest centroid is a ``bucketize`` against the midpoints of the sorted centroids, so
one iteration is O(n log k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Clustered:
    """One layer's sharing: ``codebook`` (k,) float32, ``index`` (weight shape) int64 in [0, k)."""

    codebook: Tensor
    index: Tensor

    def weight(self) -> Tensor:
        return self.codebook[self.index]


def assign(values: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest centroid for each value; ``codebook`` sorted ascending."""
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(values, midpoints)


def kmeans_1d(weight: Tensor, k: int, iterations: int = 30) -> Clustered:
    """k-means of ``weight``'s elements (any shape); empty clusters keep their centroid.

    Returns centroids sorted ascending (fewer than ``k`` when the weight has fewer distinct values)."""
    values = weight.detach().flatten().to(torch.float64).cpu()
    distinct = torch.unique(values)
    if len(distinct) <= k:
        codebook = distinct
    else:
        codebook = torch.linspace(float(values.min()), float(values.max()), k, dtype=torch.float64)
        for _ in range(iterations):
            index = assign(values, codebook)
            sums = torch.zeros_like(codebook).scatter_add_(0, index, values)
            counts = torch.zeros_like(codebook).scatter_add_(0, index, torch.ones_like(values))
            updated = torch.where(counts > 0, sums / counts.clamp(min=1), codebook)
            updated, _ = torch.sort(updated)
            if torch.allclose(updated, codebook, rtol=0, atol=1e-12):
                break
            codebook = updated
    index = assign(values, codebook).reshape(weight.shape)
    return Clustered(codebook.to(torch.float32), index.to(weight.device))


def share_weights(module: nn.Module, clustered: Clustered) -> torch.utils.hooks.RemovableHandle:
    """Set ``module.weight`` to its codebook values and average its gradient per cluster from now on.

    Every weight of a cluster then gets the same gradient; AdamW (same gradient history, same
    moments, same decay) moves them alike, so they stay equal. Returns the hook's handle."""
    index = clustered.index.to(module.weight.device)
    counts = torch.bincount(index.flatten(), minlength=len(clustered.codebook)).clamp(min=1)
    with torch.no_grad():
        module.weight.copy_(clustered.weight().to(module.weight))

    def mean_per_cluster(grad: Tensor) -> Tensor:
        sums = torch.zeros(len(counts), dtype=grad.dtype, device=grad.device).scatter_add_(
            0, index.flatten(), grad.flatten())
        return (sums / counts.to(grad.dtype))[index]

    return module.weight.register_hook(mean_per_cluster)


def snap(module: nn.Module, index: Tensor) -> Tensor:
    """Put every weight of a cluster on the cluster's mean (undoes float drift); returns the codebook."""
    w = module.weight.detach()
    flat = index.to(w.device).flatten()
    k = int(flat.max()) + 1
    sums = torch.zeros(k, dtype=torch.float64, device=w.device).scatter_add_(0, flat, w.flatten().double())
    counts = torch.bincount(flat, minlength=k).clamp(min=1)
    codebook = (sums / counts).to(w.dtype)
    with torch.no_grad():
        module.weight.copy_(codebook[index.to(w.device)])
    return codebook
