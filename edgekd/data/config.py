"""The recipe's ``data:`` section: one typed source per dataset kind, picked by ``dataset:``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from edgekd.config_base import StrictModel


class SourceConfig(StrictModel):
    """What every source's section shares (each source's ``dataset`` literal names it in
    ``edgekd.data.registry``, which builds the recipe's ``data:`` union). Three splits, stratified by class and fixed by the recipe's seed: train (fits weights), val (every
    decision: best epoch, early stopping, quantize tolerance, prune search) and test (every reported
    figure and the gate). A source with its own test split (MNIST-1D, a factory) keeps it as test."""

    batch_size: int = Field(64, ge=1, description="training batch size")
    val_fraction: float = Field(0.15, gt=0.0, lt=1.0,
                                description="share of the samples (of the training split, for a source with its own "
                                            "test split) held out for decisions, stratified by class")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0,
                                 description="share of the samples held out for the reported figures and the gate, "
                                             "stratified by class; ignored by a source with its own test split")
    normalize: bool = Field(True, description="standardise inputs with the training split's per-channel mean/std")

    @model_validator(mode="after")
    def _room_to_train(self) -> SourceConfig:
        if self.val_fraction + self.test_fraction > 0.8:
            raise ValueError(f"val_fraction {self.val_fraction:g} + test_fraction {self.test_fraction:g} leave "
                             f"under 20% of the samples to train on; lower them")
        return self


class DigitsData(SourceConfig):
    """scikit-learn's bundled 1,797 real 8x8 handwritten digit scans, resized."""

    dataset: Literal["digits"]
    image_size: int = Field(32, ge=8, le=256, description="resize the 8x8 scans to this square size")


class Mnist1dData(SourceConfig):
    """MNIST-1D (Greydanus 2020), generated offline from its templates; its official test split is the test
    split, and val is held out of its training split."""

    dataset: Literal["mnist1d"]
    num_samples: int = Field(5000, ge=100, description="samples generated (the official split keeps 20% for test)")


class NpzData(SourceConfig):
    """A .npz file with arrays ``x`` (N, ...) and ``y`` (N,) of integer labels."""

    dataset: Literal["npz"]
    path: Path
    x_key: str = "x"
    y_key: str = "y"


class ImageFolderData(SourceConfig):
    """One sub-folder per class, images read with Pillow."""

    dataset: Literal["imagefolder"]
    path: Path
    image_size: int = Field(32, ge=4, le=1024)
    channels: Literal[1, 3] = 3


class FactoryData(SourceConfig):
    """A user function ``package.module:function`` returning datasets of (x, y): ``(train, test)`` (val is then
    held out of train) or ``(train, val, test)``."""

    dataset: Literal["factory"]
    factory: str = Field(..., pattern=r"^[\w.]+:\w+$", description="package.module:function")
    kwargs: dict[str, Any] = Field(default_factory=dict)


class InMemoryData(SourceConfig):
    """Datasets held in memory by a Python caller: ``edgekd.compress(recipe, data=(train, test))`` or
    ``(train, val, test)``, each a torch ``Dataset`` of (x, y) or an ``(x, y)`` pair of tensors/arrays.
    val is held out of train when two are given. A recipe run by the CLI has no such data to read."""

    dataset: Literal["memory"]
    # the samples as given: a teacher module passed with them was trained on them as they are, and
    # standardising them here would feed it inputs it never saw (a digits CNN fell from 95% to 27%)
    normalize: bool = Field(False, description="standardise inputs with the training split's per-channel "
                                               "mean/std (off: the caller's tensors are used as given)")


