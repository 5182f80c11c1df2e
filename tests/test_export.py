"""The export stage and command on real models: a trained ResNet-20 and its pruned student.

The student is pruned with torch-pruning directly (magnitude, 50% of channels), then its
BatchNorm statistics are re-estimated on real digits, as a distillation stage would leave them.
The stage exports it once to every format for the whole module.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
import torch_pruning as tp
from pydantic import ValidationError

import edgekd.export.stage  # noqa: F401  (registers the export stage)
from edgekd.errors import ConfigError, EdgekdError, ParityError
from edgekd.export.command import export_model
from edgekd.export.config import ExportConfig
from edgekd.export.onnx_export import ExporterFallbackWarning, export_onnx
from edgekd.models.portable import save_portable
from edgekd.models.spec import ModelSpec
from edgekd.pipeline.context import Artifact, RunContext
from edgekd.pipeline.rundir import RunDir
from edgekd.pipeline.stage import stage_for
from edgekd.recipe.stages import StageEntry
from edgekd.runtimes.registry import get_runtime
from tests.training import train_briefly

SPEC = ModelSpec(model="resnet20", kwargs={"width": 8})


class _Recipe:
    """The export stage reads nothing from the recipe; the full Recipe is exercised by the pipeline tests."""

    seed = 0


@pytest.fixture(scope="module")
def teacher(digits8):
    torch.manual_seed(0)
    model = SPEC.build(digits8.num_classes, digits8.input_shape)
    return train_briefly(model, digits8, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 2)


@pytest.fixture(scope="module")
def student(teacher, digits8):
    model = copy.deepcopy(teacher).eval()
    pruner = tp.pruner.MagnitudePruner(model, digits8.example_batch(2), importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.5, ignored_layers=[model.fc])
    pruner.step()
    assert model.conv1.out_channels == 4  # really pruned
    model.train()  # re-estimate BatchNorm statistics on real data for the pruned channels
    with torch.no_grad():
        for x, _ in digits8.train_loader(128, seed=3):
            model(x.contiguous())
    return model.eval()


def _context(run_dir, data, teacher, student) -> RunContext:
    return RunContext(recipe=_Recipe(), run_dir=RunDir(run_dir), data=data, device=torch.device("cpu"),
                      teacher=teacher, student=student)


@pytest.fixture(scope="module")
def exported(teacher, student, digits8, tmp_path_factory):
    """The stage run once: the pruned student to onnx, ort and pte."""
    ctx = _context(tmp_path_factory.mktemp("run"), digits8, teacher, student)
    entry = StageEntry.model_validate({"export": {"roles": ["student"], "verify": {"samples": 200}}})
    stage_for(entry.config).run(ctx)
    return ctx


def test_config_defaults_and_validation():
    cfg = ExportConfig()
    assert cfg.formats == ["onnx", "ort", "pte"] and cfg.roles == ["teacher", "student"]
    assert cfg.opset == 18 and cfg.dynamic_batch and cfg.simplify and cfg.verify.atol == 1e-3
    assert ExportConfig(formats=["pte", "onnx"]).ordered_formats() == ["onnx", "pte"]
    with pytest.raises(ValidationError, match="add 'onnx' to formats"):
        ExportConfig(formats=["ort"])
    with pytest.raises(ValidationError, match="listed more than once: onnx"):
        ExportConfig(formats=["onnx", "onnx"])
    with pytest.raises(ValidationError):
        ExportConfig(formats=["tflite"])
    with pytest.raises(ValidationError):
        ExportConfig(opset=9)
    with pytest.raises(ValidationError):
        ExportConfig(verify={"atol": 0})
    with pytest.raises(ValidationError, match="Extra inputs"):
        ExportConfig(fromats=["onnx"])
    assert StageEntry.model_validate({"export": {}}).key == "export"


def test_check_names_the_extra_when_executorch_is_missing(monkeypatch, teacher, digits8):
    from edgekd.errors import RecipeError
    from edgekd.pipeline.context import ValidationContext
    from edgekd.runtimes.executorch_xnnpack import ExecuTorchRuntime

    ctx = ValidationContext(recipe=_Recipe(), teacher=teacher, student=teacher,
                            example_batch=digits8.example_batch(2), num_classes=10)
    stage = stage_for(ExportConfig())
    stage.check(ctx)  # installed here: nothing to report
    monkeypatch.setattr(ExecuTorchRuntime, "available", classmethod(lambda cls: False))
    with pytest.raises(RecipeError) as info:
        stage.check(ctx)
    assert info.value.key == "formats" and "pip install 'edgekd[mobile]'" in str(info.value)
    stage_for(ExportConfig(formats=["onnx", "ort"])).check(ctx)  # no pte asked: fine without it


def test_pruned_student_exports_to_every_format_with_parity(exported):
    root = exported.run_dir.path
    for fmt, suffix in (("onnx", ".onnx"), ("ort", ".ort"), ("pte", ".pte")):
        artifact = exported.artifact("student", fmt)
        assert artifact is not None and artifact.status == "ok"
        assert artifact.path == root / "artifacts" / f"student{suffix}" and artifact.path.is_file()
        assert artifact.info["file_bytes"] == artifact.path.stat().st_size
        parity = artifact.info["parity"]
        assert parity["passed"] and parity["samples"] == 200
        assert parity["max_abs_diff"] <= 1e-3 and parity["top1_agreement"] >= 0.99
        assert artifact.path in exported.stage_outputs
    rows = exported.report_data["export"]["artifacts"]
    assert [(r["role"], r["fmt"], r["status"]) for r in rows] == [
        ("student", "onnx", "ok"), ("student", "ort", "ok"), ("student", "pte", "ok")]
    assert rows[0]["path"] == "artifacts/student.onnx" and rows[0]["max_abs_diff"] is not None
    json.dumps(exported.report_data["export"])  # JSON-able for the manifest
    json.dumps([a.to_json(root) for a in exported.artifacts.values()])


def test_onnx_is_one_checked_file_with_batchnorm_folded_and_a_dynamic_batch(exported, student, digits8):
    artifacts_dir = exported.run_dir.path / "artifacts"
    written = sorted(artifacts_dir.glob("*.onnx"))
    assert written, "no .onnx written"
    for path in written:
        onnx.checker.check_model(str(path), full_check=True)
    assert not list(artifacts_dir.glob("*.data")), "weights must live inside the .onnx file"
    info = exported.artifact("student", "onnx").info
    assert info["exporter"] == "torch.export" and info["fallback_reason"] is None
    assert info["opset"] == 18 and info["simplifier"] == "onnxslim"
    assert info["batchnorm_nodes"] == 0 and info["unfused_conv_bn"] == 0
    proto = onnx.load(str(artifacts_dir / "student.onnx"))
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    loaded = get_runtime("onnxruntime").load(artifacts_dir / "student.onnx", threads=1)
    x = digits8.val_tensors(33)[0]
    for batch in (x[:1], x):
        np.testing.assert_allclose(loaded.run(batch.numpy()), student(batch).detach().numpy(), atol=1e-4)


def test_ort_has_the_mobile_verdict_and_its_operator_list(exported):
    info = exported.artifact("student", "ort").info
    assert info["converter"] == "onnxruntime.tools.convert_onnx_models_to_ort" and info["target_platform"] == "arm"
    mobile = info["mobile_usability"]
    assert mobile["checked"] and set(mobile["execution_providers"]) == {
        "nnapi", "coreml_neuralnetwork", "coreml_mlprogram"}
    for verdict in mobile["execution_providers"].values():
        assert verdict["as_is"] in {"YES", "MAYBE", "NO"} and verdict["nodes"] > 0
    assert isinstance(mobile["recommendation"], str) and mobile["recommendation"]
    config = exported.run_dir.path / "artifacts" / info["required_operators_config"]
    assert config.is_file() and "student.ort" in config.read_text()
    assert "ai.onnx:11:Conv" in info["required_operators"] or any(
        op.endswith(":Conv") or op.endswith(":FusedConv") for op in info["required_operators"])


def test_ort_tools_leave_the_host_logging_alone(exported, tmp_path):
    """onnxruntime.tools calls logging.basicConfig; edgekd is a library too and must not let it."""
    import logging

    from edgekd.export.ort_format import convert_to_ort, mobile_usability

    onnx_file = exported.artifact("student", "onnx").path
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    convert_to_ort(onnx_file, tmp_path / "again.ort")
    assert mobile_usability(onnx_file)["checked"]
    assert root.handlers == handlers and root.level == level
    assert (tmp_path / "again.ort").stat().st_size > 0


def test_pte_is_delegated_to_xnnpack_and_takes_batches_past_15(exported, student, digits8):
    info = exported.artifact("student", "pte").info
    assert info["backend"] == "XnnpackBackend" and info["delegated_subgraphs"] >= 1
    assert info["delegated_nodes"] > 20 and info["non_delegated_nodes"] <= 2
    assert info["delegated_ops"]["aten_convolution_default"] >= 19 and info["max_batch"] == 256
    # regression: lowering used to narrow the batch range to <= 15 (see executorch_export)
    loaded = get_runtime("executorch").load(exported.artifact("student", "pte").path, threads=1)
    x = digits8.val_tensors(32)[0]
    np.testing.assert_allclose(loaded.run(x.numpy()), student(x).detach().numpy(), atol=1e-4)
    del loaded


def test_parity_failure_marks_the_artifact_failed_and_keeps_earlier_ones(exported, teacher, student, digits8,
                                                                         tmp_path):
    ctx = _context(tmp_path, digits8, teacher, student)
    earlier = exported.artifact("student", "onnx")
    ctx.add_artifact(Artifact(role=earlier.role, fmt=earlier.fmt, path=earlier.path, info=dict(earlier.info)))
    # a tolerance float rounding cannot meet: the real numbers must come back in the error
    entry = StageEntry.model_validate({"export": {"formats": ["onnx"], "roles": ["teacher"],
                                                  "verify": {"samples": 64, "atol": 1e-12, "rtol": 0}}})
    with pytest.raises(ParityError) as info:
        stage_for(entry.config).run(ctx)
    (row,) = info.value.outputs
    assert row["output"] == "logits" and 0 < row["max_abs_diff"] < 1e-3 and row["top1_agreement"] == 1.0
    assert "the teacher's .onnx (teacher.onnx)" in info.value.message and "atol 1e-12" in info.value.message
    failed = ctx.artifact("teacher", "onnx")
    assert failed.status == "failed" and failed.path.is_file()
    assert failed.info["parity"]["passed"] is False and failed.info["parity"]["max_abs_diff"] == row["max_abs_diff"]
    kept = ctx.artifact("student", "onnx")
    assert kept.status == "ok" and kept.path.is_file()
    assert [r["status"] for r in ctx.report_data["export"]["artifacts"]] == ["failed"]


def test_torchscript_fallback_warns_and_says_why(student, digits8, tmp_path):
    with pytest.warns(ExporterFallbackWarning, match="opset 18 or newer and opset 17 was asked for"):
        info = export_onnx(student, digits8.example_batch(2), tmp_path / "s17.onnx", opset=17)
    assert info["exporter"] == "torchscript" and info["opset"] == 17 and "opset 17" in info["fallback_reason"]
    assert info["batchnorm_nodes"] == 0 and info["nodes"] <= info["nodes_exported"]
    onnx.checker.check_model(str(tmp_path / "s17.onnx"), full_check=True)
    loaded = get_runtime("onnxruntime").load(tmp_path / "s17.onnx", threads=1)
    x = digits8.val_tensors(8)[0]
    np.testing.assert_allclose(loaded.run(x.numpy()), student(x).detach().numpy(), atol=1e-4)


def test_export_command_writes_a_verified_ort_and_its_onnx(student, digits8, tmp_path):
    checkpoint = tmp_path / "student.pt"
    save_portable(student, checkpoint, spec=SPEC, num_classes=digits8.num_classes, input_shape=digits8.input_shape)
    out = export_model(checkpoint, "ort", tmp_path / "phone" / "model.ort",
                       inputs=digits8.val_tensors(64)[0])
    assert out == tmp_path / "phone" / "model.ort" and out.is_file()
    onnx.checker.check_model(str(tmp_path / "phone" / "model.onnx"), full_check=True)
    facts = json.loads((tmp_path / "phone" / "model.ort.json").read_text())
    assert facts["status"] == "ok" and facts["parity"]["passed"] and facts["parity_inputs"] == "given inputs"
    assert facts["mobile_usability"]["checked"]
    onnx_facts = json.loads((tmp_path / "phone" / "model.onnx.json").read_text())
    assert onnx_facts["parity"]["passed"] and onnx_facts["exporter"] == "torch.export"
    with pytest.raises(ConfigError, match="choose one of: onnx, ort, pte"):
        export_model(checkpoint, "tflite")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(EdgekdError, match="truncated.pt"):
        export_model(truncated, "onnx")


@pytest.mark.skipif((__import__("os").cpu_count() or 1) < 2, reason="roles export in parallel only with 2+ cores")
def test_roles_export_in_parallel_and_child_errors_keep_their_numbers(teacher, student, digits8, tmp_path):
    def run(name: str, **settings) -> tuple[RunContext, BaseException | None]:
        ctx = _context(tmp_path / name, digits8, teacher, student)
        entry = StageEntry.model_validate({"export": {"formats": ["onnx"], "verify": {"samples": 64}, **settings}})
        try:
            stage_for(entry.config).run(ctx)
        except EdgekdError as exc:
            return ctx, exc
        return ctx, None

    parallel, error = run("parallel")
    assert error is None and parallel.report_data["export"]["parallel_roles"] is True
    # recorded in role order whichever process finished first; the files are what one process makes
    assert [(r["role"], r["status"]) for r in parallel.report_data["export"]["artifacts"]] == [
        ("teacher", "ok"), ("student", "ok")]
    for role in ("teacher", "student"):
        artifact = parallel.artifact(role, "onnx")
        assert artifact.path.is_file() and artifact.info["parity"]["top1_agreement"] == 1.0
        assert artifact.info["parity"]["max_abs_diff"] < 1e-3 and artifact.info["batchnorm_nodes"] == 0

    # the teacher (exported in the child) fails parity: its numbers and hint cross the process boundary,
    # and the first role's error is the one raised
    failing, error = run("failing", verify={"samples": 64, "atol": 1e-12, "rtol": 0})
    assert isinstance(error, ParityError) and "the teacher's .onnx" in error.message
    assert error.hint and "atol" in error.hint
    (row,) = error.outputs
    assert 0 < row["max_abs_diff"] < 1e-3
    assert failing.artifact("teacher", "onnx").status == "failed"
    assert failing.artifact("teacher", "onnx").info["parity"]["max_abs_diff"] == row["max_abs_diff"]
