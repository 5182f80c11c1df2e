"""Datasets: sources, a stratified split, normalisation, and the in-memory ``DataBundle``."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from edgekd.data.bundle import DataBundle
from edgekd.data.config import DataConfig, DigitsData, Mnist1dData
from edgekd.data.sources import load_arrays
from edgekd.errors import DataError


def stratified_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), the same for the same labels, fraction and seed."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        rng.shuffle(idx)
        n_val = max(1, round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def load_data(cfg, seed: int = 0) -> DataBundle:
    x, y, xv, yv = load_arrays(cfg)
    if xv is None:
        tr, va = stratified_split(y, cfg.val_fraction, seed)
        x, y, xv, yv = x[tr], y[tr], x[va], y[va]
    if len(x) == 0 or len(xv) == 0:
        raise DataError(f"dataset {cfg.dataset} gave an empty split ({len(x)} train, {len(xv)} val)")
    num_classes = int(max(y.max(), yv.max())) + 1
    normalization = None
    if cfg.normalize:
        axes = (0,) + tuple(range(2, x.ndim))
        mean = x.mean(axis=axes, keepdims=True)
        std = x.std(axis=axes, keepdims=True) + 1e-6
        x, xv = (x - mean) / std, (xv - mean) / std
        normalization = {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return DataBundle(
        train=TensorDataset(to_t(x), torch.from_numpy(y)),
        val=TensorDataset(to_t(xv), torch.from_numpy(yv)),
        num_classes=num_classes,
        input_shape=tuple(int(s) for s in x.shape[1:]),
        name=cfg.dataset,
        normalization=normalization,
    )


def digits_bundle(image_size: int = 16, seed: int = 0, val_fraction: float = 0.2) -> DataBundle:
    """Real digits data for tests and tools."""
    return load_data(DigitsData(dataset="digits", image_size=image_size, val_fraction=val_fraction), seed)


def mnist1d_bundle(num_samples: int = 5000) -> DataBundle:
    return load_data(Mnist1dData(dataset="mnist1d", num_samples=num_samples))


__all__ = ["DataBundle", "DataConfig", "digits_bundle", "load_data", "mnist1d_bundle", "stratified_split"]
