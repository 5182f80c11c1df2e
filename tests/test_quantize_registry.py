"""The quantization-method registry: every registered method quantizes a tiny trained MLP on real digits
through ``run_method`` and ships a working INT8 candidate in the entry's format, measured on the entry's
runtime; the recipe's union, shorthand, schema and errors come from ``QUANT_METHODS``."""

from __future__ import annotations

import copy
import textwrap
from typing import Literal

import pytest
import torch
from torch import nn

from edgekd.config_base import StrictModel
from edgekd.errors import RecipeError
from edgekd.quantize.config import QUANT_METHODS, QuantizeConfig, QuantMethodEntry
from edgekd.quantize.methods import run_method, standalone_job
from edgekd.recipe.load import load_recipe
from edgekd.runtimes.registry import RUNTIMES
from tests.training import train_briefly

#: a short setting per method (a method missing here runs with its defaults: still covered, only slower)
FAST = {
    "ort_static": {"calibration": {"samples": 64}, "candidates": [{}]},
    "ort_dynamic": {"candidates": [{}]},
    "executorch": {"samples": 64},
    "qat": {"epochs": 1, "calibration": {"samples": 64}},
}
TIMING = {"warmup": 1, "min_time_s": 0.05, "min_iters": 3}
#: over ~20 s here (torch.export + lowering, or a training epoch): run with -m slow; test_quantize.py
#: runs both by default on its own models (executorch 46 s, qat 31 s measured on 2 busy cores)
SLOW = {"executorch", "qat"}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.head = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc1(x.flatten(1))))


@pytest.fixture(scope="module")
def mlp(digits8):
    torch.manual_seed(0)
    model = MLP()
    train_briefly(model, digits8, torch.optim.Adam(model.parameters(), lr=3e-3), 6, loader_seed=lambda _e: 0)
    with torch.no_grad():
        assert (model(digits8.val_x).argmax(1) == digits8.val_y).float().mean() > 0.85  # a trained model
    return model.eval()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in QUANT_METHODS.names()])
def test_every_method_ships_a_working_int8_model(name, mlp, digits8, tmp_path):
    entry = QUANT_METHODS[name]
    if entry.runtime in RUNTIMES and not RUNTIMES[entry.runtime].available():
        pytest.skip(RUNTIMES[entry.runtime].missing_hint)
    cfg = QuantizeConfig.model_validate({"method": {"kind": name, **FAST.get(name, {})}, "speed": TIMING,
                                         "max_accuracy_drop": 3.0, "keep_if_faster": False, "eval_samples": 200})
    job = standalone_job(cfg, digits8, copy.deepcopy(mlp), tmp_path, teacher=copy.deepcopy(mlp))
    outcome = run_method(job)
    assert outcome.fmt == entry.fmt and outcome.runtime == entry.runtime
    built = [c for c in outcome.candidates if c.ok]
    assert built, [c.error for c in outcome.candidates]
    for cand in built:
        assert cand.precision == "int8" and cand.path.is_file()
        assert cand.path.suffix == "." + ("onnx" if entry.fmt == "onnx" else entry.fmt)
        assert cand.latency_ms > 0 and cand.drop_from(outcome.fp32) <= 3.0
    assert outcome.decision.ships_int8  # keep_if_faster off and within the drop: INT8 ships


def test_recipe_union_shorthand_and_schema_list_every_method():
    mapping = QuantizeConfig.model_json_schema()["properties"]["method"]["discriminator"]["mapping"]
    assert set(mapping) == set(QUANT_METHODS)
    for name, entry in QUANT_METHODS.items():
        assert isinstance(QuantizeConfig(method=name).method, entry.config)  # `method: NAME` shorthand
        key, samples = entry.calibration_samples(QuantizeConfig(method=name).method)
        assert (key is None) == (entry.calibration_key is None) and samples >= 0


def test_unknown_method_names_file_line_key_and_valid_methods(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent("""\
        name: t
        data: {dataset: digits, image_size: 8}
        teacher: {model: resnet20, train: {epochs: 1}}
        stages:
          - quantize:
              method:
                kind: ort_statik
        """))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    err = info.value
    assert err.file.endswith("recipe.yaml") and err.line == 7
    assert err.key.endswith("quantize.method.kind") and "ort_statik" in str(err)
    assert all(name in err.hint for name in QUANT_METHODS)


def test_entry_kind_must_match_its_config():
    class Mismatched(StrictModel):
        kind: Literal["other"] = "other"

    with pytest.raises(ValueError, match="Literal"):
        QuantMethodEntry("mine", Mismatched, "x:y", fmt="onnx", runtime="onnxruntime", summary="mismatched")


def test_every_entry_names_a_known_runtime_of_its_format_and_an_importable_flow():
    for entry in QUANT_METHODS.values():
        assert RUNTIMES[entry.runtime].fmt == entry.fmt
        module, _, function = entry.flow.partition(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function))
