"""Turn a data config into raw arrays: one loader per source (``edgekd.data.registry`` pairs each with its config).

Each loader returns ``Arrays``: numpy float32 inputs and int64 labels, with the source's own
held-out splits where it has them (the caller holds out what is missing, stratified by seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgekd.data.config import DigitsData, FactoryData, ImageFolderData, InMemoryData, Mnist1dData, NpzData
from edgekd.errors import DataError

Split = tuple[np.ndarray, np.ndarray]


@dataclass
class Arrays:
    """``x`` (N, ...) / ``y`` (N,): the samples to train on (and to hold val/test out of); ``test`` and
    ``val``: the source's own (x, y) splits, None where it has none."""

    x: np.ndarray
    y: np.ndarray
    test: Split | None = None
    val: Split | None = None

    def __iter__(self):  # (x, y, x_test, y_test), as the loaders returned before
        test = self.test or (None, None)
        return iter((self.x, self.y, *test))

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """(N, C, H, W) float32 → (N, C, size, size), bilinear (antialiased when shrinking)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    t = torch.from_numpy(images)
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                                           antialias=True).numpy()


def _digits_csv() -> Path | None:
    """scikit-learn's bundled ``digits.csv.gz``, found without importing scikit-learn (None if absent)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def load_digits_arrays(cfg: DigitsData) -> Arrays:
    # The same 1797 8x8 scans sklearn.datasets.load_digits returns (64 pixels 0..16, then the label),
    # read straight from its bundled file: importing sklearn.datasets pulls in scipy, 2.4 s here.
    csv = _digits_csv()
    if csv is not None:
        table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
        images, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images, target = bunch.images, bunch.target
    x = (images.astype(np.float32) / 16.0)[:, None]
    return Arrays(_resize(x, cfg.image_size), target.astype(np.int64))


def load_mnist1d_arrays(cfg: Mnist1dData) -> Arrays:
    # get_dataset() downloads by default; make_dataset() generates offline and deterministically.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = cfg.num_samples
    d = make_dataset(args)
    return Arrays(d["x"].astype(np.float32)[:, None], d["y"].astype(np.int64),
                  test=(d["x_test"].astype(np.float32)[:, None], d["y_test"].astype(np.int64)))


def load_npz_arrays(cfg: NpzData) -> Arrays:
    if not cfg.path.is_file():
        raise DataError(f"npz file {cfg.path} does not exist")
    import zipfile

    try:
        with np.load(cfg.path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise DataError(f"{cfg.path} holds a single array, not an .npz archive of named arrays",
                                hint=f"save with np.savez(path, {cfg.x_key}=inputs, {cfg.y_key}=labels)")
            missing = [k for k in (cfg.x_key, cfg.y_key) if k not in archive.files]
            if missing:
                raise DataError(f"{cfg.path} has no array named {', '.join(missing)}",
                                hint=f"arrays in the file: {', '.join(archive.files)}")
            x_raw, y = archive[cfg.x_key], archive[cfg.y_key]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        # random bytes, a truncated zip, an object (pickled) array: never unpickled, refused here
        raise DataError(f"cannot read {cfg.path} as an .npz of numeric arrays: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}",
                        hint="save numeric arrays with np.savez (object arrays are refused: they would unpickle)"
                        ) from exc
    if not (np.issubdtype(x_raw.dtype, np.number) or x_raw.dtype == np.bool_):
        raise DataError(f"{cfg.path}: {cfg.x_key} holds {x_raw.dtype} values, not numbers")
    x = x_raw.astype(np.float32)
    if x.ndim == 1 or len(x) != len(y):
        raise DataError(f"{cfg.path}: x must be (N, ...) and y (N,), got {x.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{cfg.path}: labels must be integers, got {y.dtype}")
    if x.ndim == 2:  # (N, L) signals get a channel axis
        x = x[:, None]
    return Arrays(x, y.astype(np.int64))


def load_imagefolder_arrays(cfg: ImageFolderData) -> Arrays:
    from PIL import Image

    root = cfg.path
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"image folder {root} needs one sub-folder per class (found {len(classes)})")
    mode = "L" if cfg.channels == 1 else "RGB"
    images, labels = [], []
    for label, cls in enumerate(classes):
        before = len(images)
        for file in sorted((root / cls).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    img = img.convert(mode).resize((cfg.image_size, cfg.image_size), Image.BILINEAR)
                    arr = np.asarray(img, dtype=np.float32) / 255.0
            except OSError as exc:
                raise DataError(f"cannot read image {file}: {exc}") from exc
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            labels.append(label)
        if len(images) == before:
            raise DataError(f"class folder {root / cls} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})",
                            hint="remove the empty folder, or add its images: an empty class trains a model "
                                 "that can never predict it")
    if not images:
        raise DataError(f"no images found under {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return Arrays(np.stack(images), np.asarray(labels, dtype=np.int64))


def _to_arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 (N, ...), y int64 (N,)) of a split: an ``(x, y)`` pair of tensors/arrays, a
    ``TensorDataset``, or any dataset whose items are (x, y)."""
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and all(hasattr(a, "shape") for a in dataset):
        x, y = (a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a) for a in dataset)
        return np.ascontiguousarray(x, dtype=np.float32), np.asarray(y).astype(np.int64, copy=False)
    if isinstance(dataset, torch.utils.data.TensorDataset) and len(dataset.tensors) == 2:
        return _to_arrays(tuple(dataset.tensors))
    xs, ys = [], []
    for i in range(len(dataset)):
        x, y = dataset[i]
        xs.append(np.asarray(x, dtype=np.float32))
        ys.append(int(y))
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def _splits_to_arrays(result, what: str) -> Arrays:
    """(train, test) or (train, val, test) splits as ``Arrays``; ``what`` names them in errors."""
    if not (isinstance(result, (tuple, list)) and len(result) in (2, 3)):
        raise DataError(f"{what} must be (train, test) or (train, val, test) datasets, got {type(result).__name__}",
                        hint="val is held out of train (data.val_fraction) when two are given")
    try:
        splits = [_to_arrays(d) for d in result]
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what}: a split is not a dataset of (x, y) samples or an (x, y) pair: {exc}",
                        hint="give torch Datasets whose items are (input tensor, class index), or (x, y) "
                             "tensors") from exc
    x, y = splits[0]
    return Arrays(x, y, test=splits[-1], val=splits[1] if len(splits) == 3 else None)


def load_factory_arrays(cfg: FactoryData) -> Arrays:
    from edgekd.models.registry import resolve_factory

    try:
        result = resolve_factory(cfg.factory)(**cfg.kwargs)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"data factory {cfg.factory} failed: {exc}") from exc
    return _splits_to_arrays(result, f"data factory {cfg.factory}")


def load_memory_arrays(cfg: InMemoryData, datasets) -> Arrays:
    """The datasets a Python caller passed (``edgekd.compress(data=...)``)."""
    return _splits_to_arrays(datasets, "data=")


def check_arrays(arrays: Arrays, source: str) -> None:
    """Refuse data that would train something meaningless: labels outside 0..K-1 or a class with no
    training sample (a label of 1000 would make a 1001-class model), fewer than two classes,
    non-finite inputs, empty splits, or splits whose sample shapes differ. Raises ``DataError``."""
    splits = {"train": (arrays.x, arrays.y), "val": arrays.val, "test": arrays.test}
    shape = tuple(arrays.x.shape[1:])
    for name, split in splits.items():
        if split is None:
            continue
        x, y = split
        if len(x) == 0:
            raise DataError(f"{source}: the {name} split is empty")
        if tuple(x.shape[1:]) != shape:
            raise DataError(f"{source}: {name} samples are shaped {tuple(x.shape[1:])}, train samples {shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{source}: {name} labels must be one integer per sample, got shape {tuple(y.shape)} "
                            f"for {len(x)} samples")
        if y.min() < 0:
            raise DataError(f"{source}: {name} has label {int(y.min())}; labels are class indices 0..K-1")
        bad = ~np.isfinite(x)
        if bad.any():
            first = int(np.argwhere(bad.reshape(len(x), -1).any(axis=1))[0][0])
            raise DataError(f"{source}: {name} sample {first} holds NaN or infinite values "
                            f"({int(bad.sum())} values in all)", hint="clean or drop those samples")
    present = np.unique(arrays.y)
    if len(present) < 2:
        raise DataError(f"{source}: the training data has {len(present)} class; a classifier needs at least two")
    num_classes = int(max(int(s[1].max()) for s in splits.values() if s is not None)) + 1
    missing = sorted(set(range(num_classes)) - set(present.tolist()))
    if missing:
        shown = ", ".join(str(m) for m in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise DataError(f"{source}: labels go up to {num_classes - 1} but class(es) {shown} have no training sample "
                        f"({len(present)} classes present)",
                        hint="labels must be 0..K-1 with every class in the training data; renumber them")


def resolve_path(cfg, base: Path):
    """Make a relative ``path`` in a data config relative to the recipe file's folder."""
    if hasattr(cfg, "path") and not cfg.path.is_absolute():
        return cfg.model_copy(update={"path": (base / cfg.path)})
    return cfg
