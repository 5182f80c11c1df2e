"""One quantize stage, INT8 for every target format: ``method`` plus ``also`` (one method per format).

Real ONNX Runtime and ExecuTorch on a small MLP trained on real digits: the stage makes the ONNX INT8
and the XNNPACK INT8 .pte, times each against its own FP32 file on its own runtime and ships
``student.int8.<format>`` per format where the decision says so. Timings are never asserted: the
decisions must follow from the numbers measured in the run.
"""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from edgekd.errors import RecipeError
from edgekd.quantize.config import QuantizeConfig
from tests.training import train_briefly

pytestmark = pytest.mark.skipif(not __import__("importlib").util.find_spec("executorch"),
                                reason="executorch not installed")

FAST_TIMING = {"warmup": 1, "min_time_s": 0.1, "min_iters": 5}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


@pytest.fixture(scope="module")
def mlp(digits8):
    torch.manual_seed(0)
    model = MLP()
    train_briefly(model, digits8, torch.optim.Adam(model.parameters(), lr=3e-3), 8, loader_seed=lambda _e: 0)
    with torch.no_grad():
        assert (model(digits8.val_x).argmax(1) == digits8.val_y).float().mean() > 0.85  # a trained model
    return model.eval()


def test_also_takes_shorthands_and_allows_one_method_per_format():
    cfg = QuantizeConfig.model_validate({"method": "ort_static", "also": "executorch"})
    assert [(k, m.kind) for k, m in cfg.keyed_methods()] == [("method", "ort_static"), ("also.0", "executorch")]
    assert QuantizeConfig.model_validate({"also": [{"kind": "executorch", "samples": 32}]}).also[0].samples == 32
    assert QuantizeConfig().also == []  # existing recipes: one method, as before
    with pytest.raises(ValidationError, match="one method per format"):  # both would write student.int8.onnx
        QuantizeConfig.model_validate({"method": "ort_static", "also": ["ort_dynamic"]})
    # the fix it names is a method of another format, never the one that clashed
    with pytest.raises(ValidationError, match=r"e.g. also: \[ort_") as info:
        QuantizeConfig.model_validate({"method": "executorch", "also": [{"kind": "executorch"}]})
    assert "also: [executorch]" not in str(info.value)


def test_validate_names_the_key_of_the_also_method(digits8):
    from edgekd.quantize.stage import QuantizeStage
    from edgekd.recipe.schema import Recipe
    from edgekd.stage.context import ValidationContext

    recipe = Recipe.model_validate({"name": "q", "data": {"dataset": "digits", "image_size": 8},
                                    "teacher": {"model": "mlp", "train": {"epochs": 1}}})
    ctx = ValidationContext(recipe=recipe, teacher=MLP(), student=MLP(), example_batch=digits8.example_batch(2),
                            num_classes=10, train_samples=100)
    stage = QuantizeStage(QuantizeConfig.model_validate({"method": {"kind": "ort_static", "calibration": {"samples": 64}},
                                                         "also": [{"kind": "executorch", "samples": 500}]}))
    with pytest.raises(RecipeError, match="500 calibration samples") as info:
        stage.check(ctx)
    assert info.value.key == "quantize.also.0.samples" and "also.0.samples to at most 100" in info.value.hint


def test_stage_makes_onnx_and_pte_int8_each_timed_on_its_runtime(mlp, digits8, tmp_path):
    from edgekd.pipeline.rundir import RunDir
    from edgekd.quantize.stage import QuantizeStage
    from edgekd.recipe.schema import Recipe
    from edgekd.report.schema import Report
    from edgekd.report.stage_tables import stage_tables
    from edgekd.stage.context import RunContext

    recipe = Recipe.model_validate({"name": "q", "data": {"dataset": "digits", "image_size": 8},
                                    "teacher": {"model": "mlp", "train": {"epochs": 1}}})
    ctx = RunContext(recipe=recipe, run_dir=RunDir(tmp_path / "run"), data=digits8, device=torch.device("cpu"),
                     teacher=mlp, student=copy.deepcopy(mlp))
    cfg = QuantizeConfig.model_validate({
        "method": {"kind": "ort_static", "calibration": {"samples": 64}, "candidates": [{}]},
        "also": [{"kind": "executorch", "samples": 64}], "max_accuracy_drop": 2.0, "speed": FAST_TIMING})
    QuantizeStage(cfg).run(ctx)
    report = ctx.report_data["quantize"]
    (pte,) = report["also"]
    # the first method's report keeps its place; the .pte's is its own, timed on ExecuTorch against FP32 .pte
    assert (report["format"], report["runtime"]) == ("onnx", "onnxruntime")
    assert (pte["format"], pte["runtime"], pte["method"]["kind"]) == ("pte", "executorch", "executorch")
    assert pte["fp32"]["path"] == "artifacts/student.pte" and pte["fp32"]["latency_ms"] > 0
    for fmt, data in (("onnx", report), ("pte", pte)):
        (cand,) = [c for c in data["candidates"] if c["error"] is None]
        assert cand["latency_ms"] > 0 and cand["accuracy"] is not None and cand["speedup_vs_fp32"] > 0
        artifact = ctx.artifact("student", fmt, "int8")
        if data["shipped_precision"] == "int8":  # shipped only where measured >= 1.05x faster, within 2 points
            assert cand["speedup_vs_fp32"] >= 1.05 and cand["accuracy_drop"] <= 2.0
            assert artifact is not None and artifact.path.name == f"student.int8.{fmt}" and artifact.path.is_file()
            assert artifact.info["runtime"] == data["runtime"] and data["artifact"] == f"artifacts/student.int8.{fmt}"
        else:  # FP32 stayed: the reason carries the numbers
            assert artifact is None and "FP32" in data["reason"] and "x" in data["reason"]
    row = ctx.ledger[-1]
    assert row.notes["runtime"] == "onnxruntime" and row.notes["pte"]["runtime"] == "executorch"
    assert row.notes["pte"]["precision"] == pte["shipped_precision"]
    # which layer lost accuracy: ONNX Runtime's QDQ debugging tools, every matched tensor of the ONNX INT8 graph
    errors = report["layer_error"]
    assert errors["candidate"] == report["candidates"][0]["name"] and errors["samples"] > 0
    assert {r["op_type"] for r in errors["rows"]} & {"Gemm", "MatMul", "Relu"}  # the Linear layers' tensors
    assert all(r["xmodel_sqnr_db"] is None or r["xmodel_sqnr_db"] > 0 for r in errors["rows"])
    # the quantizer folds each Relu into its Q/DQ range: the "own" error applies the Relu first, so it reads as
    # 8-bit quantization does (tens of dB), not as the Relu's clipping of negatives (about 3 dB)
    relus = [r for r in errors["rows"] if r["op_type"] == "Relu"]
    assert relus and all(r["qdq_sqnr_db"] is not None and r["qdq_sqnr_db"] > 15 for r in relus), relus
    # where the error grows, per node: a Relu whose input (the Gemm output) has no Q/DQ pair of its own is
    # charged against the nearest measured tensor upstream, not left blank
    assert all(r["sqnr_drop_db"] is not None for r in relus), relus
    assert "layer_error" not in pte  # no QDQ graph to match in a .pte
    # both searches and the per-layer error reach the report's tables
    doc = Report(generated="now", run_dir=str(tmp_path), name="q", stage_data={"quantize": report})
    titles = [t.title for t in stage_tables(doc)]
    assert titles == ["Quantization candidates", f"INT8 error per layer: {errors['candidate']} against FP32",
                      "Quantization candidates, .pte on executorch"]


def test_layer_error_of_a_qoperator_graph_is_read_from_its_qdq_twin(mlp, digits8, tmp_path):
    """A QOperator graph keeps one QuantizeLinear at the input and one DequantizeLinear at the output and fuses
    the rest into integer operators: nothing inside can be matched against FP32. The stage reads the QDQ twin
    (same settings, QDQ format) and says so; with no twin the table says why there are no rows."""
    from edgekd.pipeline.rundir import RunDir
    from edgekd.quantize.layer_error import is_qdq_graph
    from edgekd.quantize.stage import QuantizeStage
    from edgekd.recipe.schema import Recipe
    from edgekd.report.stage_tables import layer_error_table
    from edgekd.stage.context import RunContext

    import onnx

    recipe = Recipe.model_validate({"name": "q", "data": {"dataset": "digits", "image_size": 8},
                                    "teacher": {"model": "mlp", "train": {"epochs": 1}}})

    def run(candidates: list[dict], where: str) -> dict:
        ctx = RunContext(recipe=recipe, run_dir=RunDir(tmp_path / where), data=digits8, device=torch.device("cpu"),
                         teacher=mlp, student=copy.deepcopy(mlp))
        cfg = QuantizeConfig.model_validate({
            "method": {"kind": "ort_static", "calibration": {"samples": 64}, "candidates": candidates},
            "max_accuracy_drop": 100.0, "keep_if_faster": False, "speed": FAST_TIMING})
        QuantizeStage(cfg).run(ctx)
        return ctx.report_data["quantize"]

    alone = run([{"format": "qoperator"}], "alone")
    (cand,) = alone["candidates"]
    assert not is_qdq_graph(onnx.load(str(tmp_path / "alone" / cand["path"])))  # QOperator, yet Q and DQ nodes
    errors = alone["layer_error"]
    assert "rows" not in errors and "not a QDQ graph" in errors["error"] and "no QDQ candidate" in errors["error"]
    table = layer_error_table(alone)  # the report says why, rather than dropping the table
    assert table is not None and table.rows == [[errors["error"]]]
    assert not list((tmp_path / "alone").rglob("layer_error"))  # no empty working folder left behind

    both = run([{"format": "qoperator"}, {"format": "qdq"}], "both")
    errors = both["layer_error"]
    qoperator, qdq = both["candidates"]
    assert errors["rows"] and {r["op_type"] for r in errors["rows"]} & {"Gemm", "MatMul", "Relu"}
    assert errors["candidate"] == qdq["name"]  # never the QOperator graph: it has no matchable tensors
    if errors.get("read_for"):  # the QOperator candidate was the one to explain: its twin stands in, by name
        assert errors["read_for"] == qoperator["name"] and qdq["name"] in errors["note"] and "twin" in errors["note"]
        assert errors["note"] in layer_error_table(both).caption
