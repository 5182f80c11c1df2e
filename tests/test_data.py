"""Every data source loads real data, splits deterministically and stratified, and normalises."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekd.data import load_data, stratified_split
from edgekd.data.config import DigitsData, FactoryData, ImageFolderData, Mnist1dData, NpzData
from edgekd.errors import DataError


def test_digits_resized_and_normalised():
    b = load_data(DigitsData(dataset="digits", image_size=12), seed=0)
    assert b.input_shape == (1, 12, 12) and b.num_classes == 10
    assert len(b.train) + len(b.val) + len(b.test) == 1797
    assert abs(float(b.train_x.mean())) < 1e-3 and abs(float(b.train_x.std()) - 1) < 1e-2
    assert b.train_x.is_contiguous()


def test_digits_read_without_sklearn_are_sklearns_digits(monkeypatch):
    from sklearn.datasets import load_digits

    from edgekd.data import sources

    cfg = DigitsData(dataset="digits", image_size=8)
    fast_x, fast_y, _, _ = sources.load_digits_arrays(cfg)  # from the bundled CSV, sklearn not imported
    bunch = load_digits()
    assert np.array_equal(fast_y, bunch.target) and np.allclose(fast_x[:, 0] * 16.0, bunch.images)
    monkeypatch.setattr(sources, "_digits_csv", lambda: None)  # no CSV file: load_digits() itself
    slow_x, slow_y, _, _ = sources.load_digits_arrays(cfg)
    assert np.array_equal(fast_x, slow_x) and np.array_equal(fast_y, slow_y)


def test_split_is_deterministic_and_stratified():
    y = np.repeat(np.arange(5), 40)
    tr1, va1 = stratified_split(y, 0.25, seed=3)
    tr2, va2 = stratified_split(y, 0.25, seed=3)
    tr3, _ = stratified_split(y, 0.25, seed=4)
    assert np.array_equal(va1, va2) and not np.array_equal(tr1, tr3)
    assert set(np.bincount(y[va1])) == {10}
    assert not set(tr1) & set(va1)


def test_three_splits_disjoint_stratified_and_fixed_by_seed():
    def rows(split):
        return {tuple(r.flatten().tolist()) for r in split.tensors[0]}

    cfg = DigitsData(dataset="digits", image_size=8, val_fraction=0.15, test_fraction=0.2)
    a, b, c = load_data(cfg, seed=0), load_data(cfg, seed=0), load_data(cfg, seed=1)
    assert (len(a.train), len(a.val), len(a.test)) == (1169, 269, 359)
    assert not rows(a.train) & rows(a.val) and not rows(a.train) & rows(a.test) and not rows(a.val) & rows(a.test)
    assert torch.equal(a.test.tensors[1], b.test.tensors[1]) and torch.equal(a.test_tensors()[0], b.test_tensors()[0])
    assert rows(a.test) != rows(c.test)  # the seed picks the split
    assert set(np.bincount(a.test.tensors[1].numpy())) <= {35, 36, 37}  # every class ~20%
    # a larger val never moves a test sample
    raw = cfg.model_copy(update={"normalize": False})  # normalisation follows the training split
    wider = load_data(raw.model_copy(update={"val_fraction": 0.25}), seed=0)
    assert rows(wider.test) == rows(load_data(raw, seed=0).test) and len(wider.val) > len(a.val)
    assert a.describe()["test_samples"] == 359


def test_split_fractions_must_leave_training_data():
    with pytest.raises(ValueError, match="to train on"):
        DigitsData(dataset="digits", val_fraction=0.5, test_fraction=0.4)


def test_mnist1d_official_test_split_offline():
    b = load_data(Mnist1dData(dataset="mnist1d", num_samples=1000, val_fraction=0.25))
    assert b.input_shape == (1, 40) and len(b.test) == 200  # the official 20% test split
    assert len(b.train) + len(b.val) == 800 and abs(len(b.val) - 200) <= 5  # val held out of the official training split


def test_npz_source(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(60, 3, 4)).astype(np.float32), y=np.arange(60) % 3)
    b = load_data(NpzData(dataset="npz", path=tmp_path / "d.npz", val_fraction=0.2, test_fraction=0.2))
    assert b.input_shape == (3, 4) and b.num_classes == 3 and len(b.val) == 12 and len(b.test) == 12
    np.savez(tmp_path / "bad.npz", features=np.zeros((4, 2)))
    with pytest.raises(DataError, match="no array named x"):
        load_data(NpzData(dataset="npz", path=tmp_path / "bad.npz"))


def test_imagefolder_source(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for cls in (0, 1):
        folder = tmp_path / f"class{cls}"
        folder.mkdir()
        for i, img in enumerate(digits.images[digits.target == cls][:10]):
            Image.fromarray((img * 15).astype(np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "class0" / "notes.txt").write_text("ignored")
    b = load_data(ImageFolderData(dataset="imagefolder", path=tmp_path, image_size=16, channels=1))
    assert b.input_shape == (1, 16, 16) and b.num_classes == 2 and len(b.train) + len(b.val) + len(b.test) == 20


def test_factory_source():
    # two datasets: (train, test); val is held out of train
    b = load_data(FactoryData(dataset="factory", factory="tests.factories:digits_datasets", kwargs={"n": 200},
                              val_fraction=0.2))
    assert b.input_shape == (64,) and len(b.test) == 50 and len(b.train) + len(b.val) == 150 and len(b.val) >= 20


def test_calibration_batch_from_train_split(digits8):
    batch = digits8.calibration_batch(32, seed=1)
    assert batch.shape == (32, 1, 8, 8)
    train_rows = {tuple(r.flatten().tolist()) for r in digits8.train_x}
    assert all(tuple(r.flatten().tolist()) in train_rows for r in batch)
    assert torch.equal(batch, digits8.calibration_batch(32, seed=1))
    with pytest.raises(DataError, match="calibration samples"):
        digits8.calibration_batch(len(digits8.train) + 1)
