"""The generic registry, and coverage of every runtime and export-format entry: the tables derived from
them hold each one.

Running each runtime on a real file of its format is the registry-parametrised round trip in
tests/test_runtimes.py; this file checks what an entry declares and what is derived from it.
"""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
import typing

import pytest
from matplotlib.markers import MarkerStyle
from pydantic import TypeAdapter, ValidationError

from edgekd.bench.config import DEFAULT_RUNTIMES, BenchmarkConfig
from edgekd.bench.memory import RUNTIME_LIBRARIES
from edgekd.errors import ConfigError
from edgekd.export.config import FORMAT_ORDER, ExportConfig, ExportFormat
from edgekd.export.formats import EXPORT_FORMATS
from edgekd.registry import Registry, UnknownNameError
from edgekd.report.plots import MARKERS
from edgekd.runtimes.base import Runtime
from edgekd.runtimes.registry import RUNTIME_FOR_FORMAT, RUNTIMES, parity_runtimes


@dataclasses.dataclass(frozen=True)
class Thing:
    name: str
    size: int = 0


# -- the generic registry ------------------------------------------------------------------------

def test_registry_keeps_order_and_refuses_a_second_entry_of_a_name():
    things = Registry("thing", [Thing("small", 1), Thing("large", 9)])
    assert things.names() == ("small", "large") and list(things) == ["small", "large"] and len(things) == 2
    assert things["large"].size == 9 and "small" in things and "huge" not in things and things.get("huge") is None
    with pytest.raises(ValueError, match="thing 'small' is registered twice"):
        things.add(Thing("small", 2))
    assert things["small"].size == 1  # never silently replaced
    with pytest.raises(ValueError, match="non-empty string name"):
        things.add(Thing(""))


def test_unknown_name_is_a_config_error_listing_the_valid_names():
    things = Registry("thing", [Thing("small"), Thing("large")])
    with pytest.raises(UnknownNameError) as info:
        things["huge"]
    error = info.value
    assert isinstance(error, ConfigError) and isinstance(error, KeyError) and error.exit_code == 2
    assert error.message == "unknown thing 'huge'" and error.hint == "valid things: small, large"
    assert str(error) == "unknown thing 'huge'\n  hint: valid things: small, large"


def test_literal_from_a_registry_validates_and_documents_the_names():
    things = Registry("thing", [Thing("small"), Thing("large")])
    adapter = TypeAdapter(things.literal())
    assert adapter.validate_python("large") == "large"
    with pytest.raises(ValidationError, match="'small' or 'large'"):
        adapter.validate_python("huge")
    assert adapter.json_schema()["enum"] == ["small", "large"]
    with pytest.raises(ValueError, match="no thing is registered"):
        Registry("thing").literal()


def test_registry_is_ground_and_imports_no_other_edgekd_layer():
    code = ("import sys; import edgekd.registry\n"
            "print(sorted(m for m in sys.modules if m.startswith('edgekd.') and m != 'edgekd.registry'))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.split() == ["['edgekd.errors']"]


# -- the runtime registry -----------------------------------------------------------------------

def test_importing_the_runtime_registry_and_the_benchmark_config_loads_no_runtime_library():
    code = ("import sys; import edgekd.runtimes.registry, edgekd.bench.config, edgekd.bench.memory\n"
            "print([m for m in ('torch', 'onnxruntime', 'executorch', 'openvino') if m in sys.modules])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("name", RUNTIMES.names())
def test_every_runtime_entry_is_complete_and_derived_everywhere(name):
    entry = RUNTIMES[name]
    cls = entry.runtime_class()  # importing the class never needs the runtime's own package
    assert issubclass(cls, Runtime) and cls.name == name and cls().fmt == entry.fmt
    assert entry.suffix == RUNTIME_FOR_FORMAT[entry.fmt].suffix  # one suffix per format
    MarkerStyle(entry.marker)  # a marker matplotlib draws (raises ValueError otherwise)
    # the hand-kept tables of before are now derived from the entry
    assert MARKERS[name] == entry.marker and RUNTIME_LIBRARIES[name] == entry.library
    assert BenchmarkConfig(runtimes=[name]).runtimes == [name]
    assert (name in DEFAULT_RUNTIMES) == entry.default
    assert f"{name}: {entry.suffix}" in BenchmarkConfig.model_fields["runtimes"].description
    hint = entry.missing_hint
    assert "\n" not in hint and hint.startswith(f"the {name} runtime is not installed: pip install ")
    assert (f"edgekd[{entry.extra}]" in hint) if entry.extra else hint.endswith("pip install edgekd")


def test_markers_tell_runtimes_apart():
    markers = [e.marker for e in RUNTIMES.values()]
    assert len(set(markers)) == len(markers)


def test_a_second_runtime_for_a_format_does_not_replace_its_parity_runtime():
    onnx = RUNTIME_FOR_FORMAT["onnx"]
    other = dataclasses.replace(onnx, name="other-onnx", impl="x:Y", parity=False, marker="x")
    entries = [*RUNTIMES.values(), other]
    assert parity_runtimes(entries)["onnx"].name == "onnxruntime"
    with pytest.raises(ValueError, match="format 'onnx' has two parity runtimes: onnxruntime and other-onnx"):
        parity_runtimes([*RUNTIMES.values(), dataclasses.replace(other, parity=True)])
    with pytest.raises(ValueError, match="no parity runtime for format"):
        parity_runtimes([other])


def test_unknown_runtime_in_a_recipe_lists_every_valid_name():
    with pytest.raises(ValidationError) as info:
        BenchmarkConfig(runtimes=["onnxruntime", "tflite"])
    text = str(info.value)
    assert all(f"'{name}'" in text for name in RUNTIMES)


# -- the stage registry -------------------------------------------------------------------------

def test_every_recipe_stage_key_has_its_registered_stage_and_every_stage_is_reachable():
    """The recipe's ``stages:`` keys (``StageEntry``'s fields) and the stages registered by type are one set:
    a stage registered but missing from the recipe could never run, and a key without a stage would fail
    only at run time. ``benchmark`` is the recipe's own top-level section, not a ``stages:`` item."""
    import edgekd.pipeline.stages  # noqa: F401 - the composition root registers every stage
    from edgekd.recipe.schema import Recipe
    from edgekd.recipe.stages import StageEntry
    from edgekd.stage.base import registered_stages

    stages = registered_stages()
    by_name = {stage.name: config for config, stage in stages.items()}
    assert len(by_name) == len(stages)  # one name per stage
    assert set(StageEntry.model_fields) == set(by_name) - {"benchmark"}
    for key, field in StageEntry.model_fields.items():
        assert by_name[key] in typing.get_args(field.annotation)  # the key holds its stage's own config type
    assert typing.get_args(Recipe.model_fields["benchmark"].annotation)[0] is by_name["benchmark"]


# -- the export-format registry -----------------------------------------------------------------

@pytest.mark.parametrize("name", list(EXPORT_FORMATS))
def test_every_export_format_entry_is_complete_and_derived_everywhere(name):
    """Each format: its maker resolves, its parity runtime runs its suffix, the recipe's Literal and the
    make order hold it (after its source), and the export field's description names it. Making and
    checking a real file of each format is tests/test_export.py."""
    entry = EXPORT_FORMATS[name]
    module, _, function = entry.maker.partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    assert RUNTIME_FOR_FORMAT[name].suffix == entry.suffix  # the file export writes is the one its runtime runs
    assert name in typing.get_args(ExportFormat)
    if entry.source is not None:
        assert FORMAT_ORDER.index(entry.source) < FORMAT_ORDER.index(name)
    assert f"{name}: {entry.summary}" in ExportConfig.model_fields["formats"].description
    assert ExportConfig(formats=[*([entry.source] if entry.source else []), name]).ordered_formats()[-1] == name


def test_a_format_without_its_source_and_an_unknown_format_are_recipe_errors():
    with pytest.raises(ValidationError, match="'ort' is converted from the ONNX export: add 'onnx'"):
        ExportConfig(formats=["ort"])
    with pytest.raises(ValidationError) as excinfo:
        ExportConfig(formats=["tflite"])
    assert all(f"'{name}'" in str(excinfo.value) for name in EXPORT_FORMATS)


def test_a_format_registered_before_its_source_is_refused():
    from edgekd.export.formats import ExportFormatEntry, _sources_first

    late = Registry("export format", [ExportFormatEntry("ort", ".ort", "m:f", "x", source="onnx"),
                                      ExportFormatEntry("onnx", ".onnx", "m:f", "y")])
    with pytest.raises(ValueError, match="registered before it"):
        _sources_first(late)
