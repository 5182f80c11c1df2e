"""The data-source registry: one entry per ``dataset:`` kind, from which the recipe's ``data:`` union and
the loader dispatch are derived.

An entry pairs a config class (its ``dataset`` literal is the entry's name) with the function that turns
it into ``Arrays``. Adding a source is its config class, its loader and one entry here; the recipe schema
(``DataConfig``, a pydantic union discriminated by ``dataset``), the JSON Schema's list of valid kinds and
``load_arrays`` follow from the entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import Field

from edgekd.data.config import (
    DigitsData,
    FactoryData,
    ImageFolderData,
    InMemoryData,
    Mnist1dData,
    NpzData,
    SourceConfig,
)
from edgekd.data.sources import (
    Arrays,
    check_arrays,
    load_digits_arrays,
    load_factory_arrays,
    load_imagefolder_arrays,
    load_memory_arrays,
    load_mnist1d_arrays,
    load_npz_arrays,
)
from edgekd.errors import DataError
from edgekd.registry import Registry


@dataclass(frozen=True)
class DataSourceEntry:
    """``config``: the source's typed section (its ``dataset: Literal[...]`` is the name recipes write);
    ``load``: ``(config) -> Arrays``, or ``(config, datasets) -> Arrays`` when ``from_python`` (the splits a
    Python caller passed to ``edgekd.compress(data=...)``: no CLI recipe can read such a source)."""

    config: type[SourceConfig]
    load: Callable[..., Arrays]
    from_python: bool = False

    @property
    def name(self) -> str:
        return self.config.model_fields["dataset"].annotation.__args__[0]


DATA_SOURCES: Registry[DataSourceEntry] = Registry("data source", [
    DataSourceEntry(DigitsData, load_digits_arrays),
    DataSourceEntry(Mnist1dData, load_mnist1d_arrays),
    DataSourceEntry(NpzData, load_npz_arrays),
    DataSourceEntry(ImageFolderData, load_imagefolder_arrays),
    DataSourceEntry(FactoryData, load_factory_arrays),
    DataSourceEntry(InMemoryData, load_memory_arrays, from_python=True),
])

#: the recipe's ``data:`` section: one of the registered configs, picked by its ``dataset`` key
DataConfig = Annotated[Union[tuple(e.config for e in DATA_SOURCES.values())],  # noqa: UP007 - built from a tuple
                       Field(discriminator="dataset")]


def cli_sources() -> list[str]:
    """The sources a recipe file can name on its own (every one but those fed from Python)."""
    return [e.name for e in DATA_SOURCES.values() if not e.from_python]


def load_arrays(cfg: SourceConfig, datasets: Any = None) -> Arrays:
    """The source's arrays, checked (``check_arrays``) before anything trains on them. ``datasets``: the
    in-memory splits of a source fed from Python (``dataset: memory``), and only of it. Raises ``DataError``."""
    entry = DATA_SOURCES[cfg.dataset]
    if entry.from_python:
        if datasets is None:
            raise DataError(f"dataset: {entry.name} reads datasets passed from Python (edgekd.compress(recipe, "
                            "data=(train, test))), and none were passed",
                            hint=f"name a source the CLI can read ({', '.join(cli_sources())})")
        arrays = entry.load(cfg, datasets)
    elif datasets is not None:
        raise DataError(f"datasets were passed from Python but the recipe's data section reads {cfg.dataset}",
                        hint="set data.dataset to memory (edgekd.compress does this when it is given data=)")
    else:
        arrays = entry.load(cfg)
    check_arrays(arrays, describe_source(cfg))
    return arrays


def describe_source(cfg: SourceConfig) -> str:
    """How messages name the source: its file or folder, its factory, or the passed datasets."""
    if DATA_SOURCES[cfg.dataset].from_python:
        return "the datasets passed to edgekd.compress"
    return str(getattr(cfg, "path", None) or getattr(cfg, "factory", None) or type(cfg).__name__)
