"""Datasets: sources, stratified train/val/test splits, normalisation, and the in-memory ``DataBundle``.

Val serves every decision a run makes (best epoch, early stopping, the quantize tolerance, the
prune search); test serves every reported figure and the accuracy gate, so no reported number
is the maximum over choices made on it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from edgekd.data.bundle import DataBundle
from edgekd.data.config import DigitsData, Mnist1dData
from edgekd.data.registry import DataConfig, load_arrays
from edgekd.errors import DataError


def _class_counts(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Samples of one class for each held-out fraction, at least one each while one is left to train on."""
    counts = []
    for fraction in fractions:
        take = max(1, round(n * fraction)) if n - sum(counts) > 1 else 0
        counts.append(min(take, max(n - sum(counts) - 1, 0)))
    return counts


def stratified_splits(y: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Sorted index arrays ``[train, held_out_1, held_out_2, ...]``: each class is shuffled by ``seed``
    and cut by ``fractions`` (shares of that class), so every split keeps the class balance. The same
    labels, fractions and seed give the same indices on any machine (numpy's PCG64)."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        rng.shuffle(idx)
        start = 0
        for i, count in enumerate(_class_counts(len(idx), fractions), start=1):
            parts[i].append(idx[start:start + count])
            start += count
        parts[0].append(idx[start:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def stratified_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), the same for the same labels, fraction and seed."""
    train, val = stratified_splits(y, (val_fraction,), seed)
    return train, val


def _hold_out(cfg, seed: int, datasets=None):
    """(train, val, test) as (x, y) pairs: the source's own splits where it has them, the rest held out
    of its samples. Within each class test is cut before val, so changing val_fraction never moves a
    test sample."""
    arrays = load_arrays(cfg, datasets)
    x, y, test, val = arrays.x, arrays.y, arrays.test, arrays.val
    if test is None:
        tr, te, va = stratified_splits(y, (cfg.test_fraction, cfg.val_fraction), seed)
        return (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te])
    if val is None:
        tr, va = stratified_splits(y, (cfg.val_fraction,), seed)
        return (x[tr], y[tr]), (x[va], y[va]), test
    return (x, y), val, test


def load_data(cfg, seed: int = 0, datasets=None) -> DataBundle:
    """The recipe's data as train/val/test tensors, normalised with the training split's statistics.
    ``datasets``: for ``dataset: memory``, the (train, test) or (train, val, test) splits a Python caller
    passed. Raises ``DataError`` for an empty split or datasets given to another source."""
    (x, y), (xv, yv), (xt, yt) = _hold_out(cfg, seed, datasets)
    sizes = {"train": len(x), "val": len(xv), "test": len(xt)}
    if min(sizes.values()) == 0:
        raise DataError(f"dataset {cfg.dataset} gave an empty split ({', '.join(f'{v} {k}' for k, v in sizes.items())})",
                        hint="use more samples or larger data.val_fraction / data.test_fraction")
    num_classes = int(max(y.max(), yv.max(), yt.max())) + 1
    normalization = None
    if cfg.normalize:
        axes = (0,) + tuple(range(2, x.ndim))
        mean = x.mean(axis=axes, keepdims=True)
        std = x.std(axis=axes, keepdims=True) + 1e-6
        x, xv, xt = (x - mean) / std, (xv - mean) / std, (xt - mean) / std
        normalization = {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return DataBundle(
        train=TensorDataset(to_t(x), torch.from_numpy(y)),
        val=TensorDataset(to_t(xv), torch.from_numpy(yv)),
        test=TensorDataset(to_t(xt), torch.from_numpy(yt)),
        num_classes=num_classes,
        input_shape=tuple(int(s) for s in x.shape[1:]),
        name=cfg.dataset,
        normalization=normalization,
        batch_size=cfg.batch_size,
    )


def digits_bundle(image_size: int = 16, seed: int = 0, val_fraction: float = 0.15,
                  test_fraction: float = 0.2) -> DataBundle:
    """Real digits data for tests and tools: 1,797 scans, train/val/test stratified by ``seed``."""
    return load_data(DigitsData(dataset="digits", image_size=image_size, val_fraction=val_fraction,
                                test_fraction=test_fraction), seed)


def mnist1d_bundle(num_samples: int = 5000, seed: int = 0, val_fraction: float = 0.15) -> DataBundle:
    """MNIST-1D with its official test split; val held out of its training split by ``seed``."""
    return load_data(Mnist1dData(dataset="mnist1d", num_samples=num_samples, val_fraction=val_fraction), seed)


__all__ = ["DataBundle", "DataConfig", "digits_bundle", "load_data", "mnist1d_bundle", "stratified_split",
           "stratified_splits"]
