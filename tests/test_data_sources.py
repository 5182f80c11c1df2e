"""Coverage of the data-source registry: every registered ``dataset:`` kind loads real data through a
recipe's ``data:`` section into three stratified splits, and the recipe schema lists exactly the
registered kinds. A new source without a case here fails ``test_every_source_has_a_case``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError
from sklearn.datasets import load_digits

from edgekd.data import load_data
from edgekd.data.registry import DATA_SOURCES, DataConfig, cli_sources
from edgekd.errors import DataError
from edgekd.recipe.schema import Recipe
from tests.factories import digits_datasets


def _npz(tmp: Path) -> tuple[dict, None]:
    d = load_digits()
    np.savez(tmp / "digits.npz", x=d.images[:300, None].astype(np.float32), y=d.target[:300])
    return {"dataset": "npz", "path": str(tmp / "digits.npz")}, None


def _imagefolder(tmp: Path) -> tuple[dict, None]:
    from PIL import Image

    d = load_digits()
    for cls in range(3):
        (tmp / f"c{cls}").mkdir()
        for i, img in enumerate(d.images[d.target == cls][:20]):
            Image.fromarray((img * 15).astype(np.uint8)).save(tmp / f"c{cls}" / f"{i}.png")
    return {"dataset": "imagefolder", "path": str(tmp), "image_size": 8, "channels": 1}, None


#: dataset kind -> (tmp folder) -> (its data section, the datasets passed from Python or None)
CASES = {
    "digits": lambda tmp: ({"dataset": "digits", "image_size": 8}, None),
    "mnist1d": lambda tmp: ({"dataset": "mnist1d", "num_samples": 400}, None),
    "npz": _npz,
    "imagefolder": _imagefolder,
    "factory": lambda tmp: ({"dataset": "factory", "factory": "tests.factories:digits_datasets",
                            "kwargs": {"n": 300}}, None),
    "memory": lambda tmp: ({"dataset": "memory"}, digits_datasets(300)),
}


def test_every_source_has_a_case_and_the_schema_lists_exactly_the_registered_kinds():
    assert set(CASES) == set(DATA_SOURCES)
    schema = Recipe.model_json_schema()
    kinds = {d["properties"]["dataset"]["const"] for name, d in schema["$defs"].items()
             if "dataset" in d.get("properties", {})}
    assert kinds == set(DATA_SOURCES)
    assert cli_sources() == [n for n in DATA_SOURCES if n != "memory"]


@pytest.mark.parametrize("kind", list(CASES))
def test_source_loads_three_stratified_splits(kind, tmp_path):
    section, datasets = CASES[kind](tmp_path)
    config = TypeAdapter(DataConfig).validate_python(section)
    assert type(config) is DATA_SOURCES[kind].config
    bundle = load_data(config, seed=0, datasets=datasets)
    sizes = [len(bundle.train), len(bundle.val), len(bundle.test)]
    assert min(sizes) > 0 and bundle.num_classes >= 3 and bundle.name == kind
    train_labels = set(bundle.train.tensors[1].tolist())
    assert set(bundle.test.tensors[1].tolist()) <= train_labels  # every test class is trained on
    assert bundle.train.tensors[0].isfinite().all()


def test_an_unregistered_kind_is_refused_naming_the_valid_ones():
    with pytest.raises(ValidationError) as info:
        TypeAdapter(DataConfig).validate_python({"dataset": "cifar10"})
    message = str(info.value)
    assert all(f"'{name}'" in message for name in DATA_SOURCES)


def test_python_fed_source_without_datasets_names_the_cli_sources():
    config = TypeAdapter(DataConfig).validate_python({"dataset": "memory"})
    with pytest.raises(DataError, match="none were passed") as info:
        load_data(config)
    assert info.value.hint == f"name a source the CLI can read ({', '.join(cli_sources())})"
    with pytest.raises(DataError, match="reads digits"):
        load_data(TypeAdapter(DataConfig).validate_python({"dataset": "digits"}), datasets=digits_datasets(100))
