"""A loaded dataset split into train, validation and test, with the loaders every stage uses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from edgekd.errors import DataError


@dataclass
class DataBundle:
    """In-memory train/val/test tensors (edge-sized datasets fit in memory).

    ``x`` tensors are float32, normalised and contiguous; ``y`` are int64 class indices.
    ``input_shape`` is the shape of one sample, e.g. ``(1, 32, 32)`` or ``(1, 40)``. ``val`` serves
    decisions (best epoch, tolerances, searches); ``test`` only reported figures. ``test`` is None
    only for a bundle built by hand (``load_data`` always holds one out).
    """

    train: TensorDataset
    val: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]
    name: str = "data"
    #: per-channel mean/std subtracted/divided before the model; deployed models expect the same
    normalization: dict[str, list[float]] | None = None
    test: TensorDataset | None = None
    #: the recipe's ``data.batch_size``: the training batch of every trainer (teacher, distill, finetune)
    #: whose own ``train`` block sets none; None falls back to the trainer's default (64)
    batch_size: int | None = None

    def describe(self) -> dict:
        return {"dataset": self.name, "train_samples": len(self.train), "val_samples": len(self.val),
                "test_samples": len(self.test) if self.test is not None else 0,
                "splits": {"val": "decisions: best epoch, early stopping, quantize tolerance, prune search",
                           "test": "reported accuracy and the gate"},
                "num_classes": self.num_classes, "input_shape": list(self.input_shape),
                "batch_size": self.batch_size, "normalization": self.normalization}

    @property
    def train_x(self) -> torch.Tensor:
        return self.train.tensors[0]

    @property
    def train_y(self) -> torch.Tensor:
        return self.train.tensors[1]

    @property
    def val_x(self) -> torch.Tensor:
        return self.val.tensors[0]

    @property
    def val_y(self) -> torch.Tensor:
        return self.val.tensors[1]

    def train_loader(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                     drop_last: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(self.train, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                          generator=generator)

    def val_loader(self, batch_size: int) -> DataLoader:
        return DataLoader(self.val, batch_size=batch_size, shuffle=False)

    def calibration_batch(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` real samples drawn without replacement from the training split."""
        total = len(self.train)
        if n > total:
            raise DataError(
                f"asked for {n} calibration samples but the training split has only {total}",
                hint=f"set samples to at most {total}",
            )
        idx = np.random.default_rng(seed).choice(total, size=n, replace=False)
        return self.train_x[torch.as_tensor(np.sort(idx))].contiguous()

    def val_tensors(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.val_x, self.val_y
        if limit is not None:
            x, y = x[:limit], y[:limit]
        return x.contiguous(), y

    @property
    def has_test(self) -> bool:
        return self.test is not None and len(self.test) > 0

    def test_tensors(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the test split (the first ``limit`` samples): for reported figures only."""
        if self.test is None:
            raise DataError(f"the {self.name} data has no test split",
                            hint="load it with edgekd.data.load_data, which holds one out")
        x, y = self.test.tensors
        if limit is not None:
            x, y = x[:limit], y[:limit]
        return x.contiguous(), y

    def example_batch(self, batch_size: int = 2) -> torch.Tensor:
        return self.val_x[:batch_size].contiguous()
