"""The export stage and command on real models: a trained ResNet-20 and its pruned student.

The student is pruned with torch-pruning directly (magnitude, 50% of channels), then its
BatchNorm statistics are re-estimated on real digits, as a distillation stage would leave them.
The stage exports it once to every format for the whole module.
"""

from __future__ import annotations

import copy
import inspect
import json
import textwrap

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from pydantic import ValidationError
from torch import nn

import edgekd.export.stage  # noqa: F401  (registers the export stage)
from edgekd.errors import ConfigError, EdgekdError, ParityError
from edgekd.export.command import export_model
from edgekd.export.config import ExportConfig
from edgekd.export.onnx_export import ExporterFallbackWarning, export_onnx
from edgekd.models.portable import save_portable
from edgekd.models.spec import ModelSpec
from edgekd.pipeline.rundir import RunDir
from edgekd.recipe.stages import StageEntry
from edgekd.runtimes.registry import get_runtime
from edgekd.stage.base import stage_for
from edgekd.stage.context import Artifact, RunContext
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
    from edgekd.runtimes.executorch_xnnpack import ExecuTorchRuntime
    from edgekd.stage.context import ValidationContext

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
    assert info["delegated_share"] >= 0.9 and info["warnings"] == []
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
    # without --out the file goes beside the checkpoint, where a run keeps its own artifacts: never replaced
    (tmp_path / "student.onnx").write_bytes(b"the run's own file")
    with pytest.raises(ConfigError, match="student.onnx exists") as refused:
        export_model(checkpoint, "onnx")
    assert "--out" in refused.value.hint and (tmp_path / "student.onnx").read_bytes() == b"the run's own file"
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


# -- artifacts verified the way they will be used (issue 13) ----------------------------------
class ChunkGateNet(nn.Module):
    """A gated conv whose channels are chunked in two: torch.export bakes the example batch into the
    split, so the .pte takes batches of exactly the example's size (batch 1 and odd batches fail)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(a * torch.sigmoid(b), 1), 1))


class SpectralNet(nn.Module):
    """An rfft magnitude as a second input channel (complex tensors inside the graph)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 8, 5, padding=2)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        spectrum = torch.log1p(torch.fft.rfft(x, dim=-1).abs())
        spectrum = F.pad(spectrum, (0, x.shape[-1] - spectrum.shape[-1]))
        return self.fc(torch.relu(self.conv(torch.cat([x, spectrum], dim=1))).mean(dim=2))


class _RecipeWithBenchmark(_Recipe):
    def __init__(self, batch_sizes: list[int]) -> None:
        from edgekd.bench.config import BenchmarkConfig

        self.benchmark = BenchmarkConfig(runtimes=["onnxruntime", "executorch"], threads=[1], batch_sizes=batch_sizes,
                                         warmup=1, min_time_s=0.0, min_iters=2, memory=False, peak=False)


def test_a_pte_that_cannot_run_batch_one_fails_alone_and_the_benchmark_skips_it(digits8, tmp_path, capfd,
                                                                               monkeypatch):
    # export_pte now rewrites splits as slices (tests/test_cases.py); without the rewrite the chunk is
    # ExecuTorch's split_with_sizes_copy, which cannot resize: a real .pte that runs only at batch 2
    from edgekd.export import executorch_export

    monkeypatch.setattr(executorch_export, "_EXPORT_DECOMPOSITIONS", {})
    torch.manual_seed(0)
    model = ChunkGateNet()
    train_briefly(model, digits8, torch.optim.Adam(model.parameters(), lr=1e-2), 2)
    ctx = RunContext(recipe=_RecipeWithBenchmark([1, 8]), run_dir=RunDir(tmp_path), data=digits8,
                     device=torch.device("cpu"), teacher=model, student=copy.deepcopy(model))
    entry = StageEntry.model_validate({"export": {"formats": ["onnx", "pte"], "parallel": False,
                                                  "verify": {"samples": 64}}})
    stage_for(entry.config).run(ctx)  # the run carries on: no exception
    summary = ctx.report_data["export"]
    assert summary["parity_batch_sizes"] == [1, 3, 8]  # verify's own and the benchmark's
    for role in ("teacher", "student"):
        onnx_artifact, pte = ctx.artifact(role, "onnx"), ctx.artifact(role, "pte")
        assert onnx_artifact.status == "ok"
        assert [b["batch"] for b in onnx_artifact.info["parity"]["batches"]] == [1, 3, 8]
        assert pte.status == "failed"
        assert "cannot run batch 3" in pte.info["error"] and "accepts batches of at most 2" in pte.info["error"]
        assert "exported for up to 256" in pte.info["error"]
        # no dead file ships: the .pte is set aside for inspection, outside artifacts/
        assert not (tmp_path / "artifacts" / f"{role}.pte").exists()
        assert pte.path == tmp_path / "stages" / "export" / "failed" / f"{role}.pte" and pte.path.is_file()
    assert [(f["role"], f["fmt"]) for f in summary["failed"]] == [("teacher", "pte"), ("student", "pte")]
    assert "failed and is not shipped" in capfd.readouterr().err
    # run at batch 1 anyway: ExecuTorch's own explanation (printed on fd 2) lands in the error, not on the terminal
    from edgekd.errors import StageError
    from edgekd.export.parity import check_batch_sizes

    loaded = get_runtime("executorch").load(ctx.artifact("student", "pte").path, threads=1)
    with pytest.raises(StageError, match=r"fails at batch 1 .*native log: .*Attempted to resize a static tensor"):
        check_batch_sizes(model, loaded, digits8.val_tensors(4)[0], [1], atol=1e-3, rtol=1e-2, label="chunked")
    del loaded
    assert "tensor_impl" not in capfd.readouterr().err
    # the benchmark times what passed and says why the executorch runtime has nothing to time
    from edgekd.bench.stage import BenchmarkStage

    BenchmarkStage(ctx.recipe.benchmark.model_copy(update={"batch_sizes": [1]})).run(ctx)
    bench = ctx.report_data["benchmark"]
    assert {row["runtime"] for row in bench["latency_p50"]} == {"onnxruntime"}
    skipped = [n for n in bench["notes"] if "student fp32 .pte artifact is not usable" in n]
    assert skipped and "cannot run batch 3" in skipped[0]


def test_a_format_the_runtime_lacks_keeps_its_whole_cause_and_the_others_ship(tmp_path):
    from edgekd.data import mnist1d_bundle

    data = mnist1d_bundle(num_samples=600)
    torch.manual_seed(0)
    model = SpectralNet()
    train_briefly(model, data, torch.optim.Adam(model.parameters(), lr=1e-2), 2)
    ctx = RunContext(recipe=_Recipe(), run_dir=RunDir(tmp_path), data=data, device=torch.device("cpu"),
                     teacher=model, student=model)
    entry = StageEntry.model_validate({"export": {"roles": ["student"], "verify": {"samples": 64}}})
    stage_for(entry.config).run(ctx)
    assert ctx.artifact("student", "onnx").status == "ok" and ctx.artifact("student", "ort").status == "ok"
    assert ctx.artifact("student", "ort").info["parity"]["passed"]
    pte = ctx.artifact("student", "pte")
    error = pte.info["error"]
    line = inspect.getsourcelines(SpectralNet.forward)[1] + 1
    assert pte.status == "failed" and error.startswith("exporting the student to pte: not supported by ExecuTorch: "
                                                       "complex tensors (aten.fft_rfft.default gives complex64")
    assert f"test_export.py:{line}" in error
    # the part after "mismatched dtypes:" that a one-line message dropped: the operator and its dtype
    assert "mismatched dtypes:" in error and "aten.abs.default" in error and "torch.complex64" in error
    assert not list((tmp_path / "artifacts").glob("*.pte"))


def test_parity_follows_the_logits_scale_and_still_catches_a_changed_model(teacher, digits8, tmp_path):
    from edgekd.export.config import VerifyConfig
    from edgekd.export.parity import check_parity

    big = copy.deepcopy(teacher).eval()
    with torch.no_grad():  # logits in the tens of thousands: float rounding alone is then above 1e-3
        big.fc.weight.mul_(1000.0)
        big.fc.bias.mul_(1000.0)
    export_onnx(big, digits8.example_batch(2), tmp_path / "big.onnx")
    loaded = get_runtime("onnxruntime").load(tmp_path / "big.onnx", threads=1)
    x = digits8.val_tensors(128)[0]
    with pytest.raises(ParityError, match=r"max abs diff .* \(allowed: atol 0.001 \+ rtol 0 x"):
        check_parity(big, loaded, x, atol=1e-3, rtol=0.0, min_top1_agreement=0.99, label="absolute only")
    verify = VerifyConfig()
    result = check_parity(big, loaded, x, atol=verify.atol, rtol=verify.rtol,
                          min_top1_agreement=verify.min_top1_agreement, label="scaled", batch_sizes=[1, 3])
    assert result["passed"] and result["max_abs_diff"] > 1e-3 and result["max_rel_diff"] < 1e-4
    assert result["cosine_similarity"] > 0.999999 and result["sqnr_db"] > 80
    assert [b["batch"] for b in result["batches"]] == [1, 3]
    # a model the export changed (one BatchNorm's statistics off, as a layer left in training mode) still fails
    changed = copy.deepcopy(big)
    with torch.no_grad():
        changed.bn1.running_var.mul_(4.0)
    with pytest.raises(ParityError, match=r"worst sample off by \d+"):
        check_parity(changed, loaded, x, atol=verify.atol, rtol=verify.rtol,
                     min_top1_agreement=verify.min_top1_agreement, label="changed")


def test_pte_reports_its_xnnpack_share_and_warns_when_low(tmp_path):
    from edgekd.export.executorch_export import export_pte

    # weight-normalised convolutions compute their weight in the graph, so XNNPACK (static weights) takes
    # only the rest: the case that ran about 60x slower than ONNX Runtime
    wn = nn.utils.parametrizations.weight_norm
    model = nn.Sequential(wn(nn.Conv1d(1, 8, 3, padding=1)), nn.ReLU(), wn(nn.Conv1d(8, 8, 3, padding=1)), nn.ReLU(),
                          nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    info = export_pte(model, torch.randn(2, 1, 16), tmp_path / "wn.pte", max_batch=8)
    total = info["delegated_nodes"] + info["non_delegated_nodes"]
    assert info["delegated_share"] == round(info["delegated_nodes"] / total, 4) and info["delegated_share"] < 0.8
    (warning,) = info["warnings"]
    assert f"only {100 * info['delegated_share']:.0f}% of the .pte's compute operators run in XNNPACK" in warning
    assert "portable CPU kernels" in warning and "aten_convolution_default" in warning


@pytest.mark.skipif((__import__("os").cpu_count() or 1) < 2, reason="roles export in parallel only with 2+ cores")
def test_a_model_the_parallel_child_cannot_import_falls_back_in_one_quiet_line(digits8, tmp_path, capfd):
    """A user model whose module cannot be imported in a fresh process (here: its folder is gone from
    sys.path, as with a model defined in a notebook or a script run from elsewhere)."""
    import importlib
    import sys

    package = tmp_path / "src"
    package.mkdir()
    (package / "vanishing_model.py").write_text(textwrap.dedent("""\
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 8, 3, padding=1)
                self.fc = nn.Linear(8, 10)

            def forward(self, x):
                return self.fc(torch.relu(self.conv(x)).mean((2, 3)))
        """))
    sys.path.insert(0, str(package))
    try:
        module = importlib.import_module("vanishing_model")
    finally:
        sys.path.remove(str(package))
    (package / "vanishing_model.py").unlink()
    try:
        torch.manual_seed(0)
        model = module.Net()
        train_briefly(model, digits8, torch.optim.Adam(model.parameters(), lr=1e-2), 1)
        capfd.readouterr()
        ctx = _context(tmp_path / "run", digits8, model, copy.deepcopy(model))
        entry = StageEntry.model_validate({"export": {"formats": ["onnx"], "verify": {"samples": 32}}})
        stage_for(entry.config).run(ctx)
    finally:
        sys.modules.pop("vanishing_model", None)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "No module named" in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    summary = ctx.report_data["export"]
    assert summary["parallel_roles"] is False and "No module named 'vanishing_model'" in summary["parallel_fallback"]
    assert [(r["role"], r["status"]) for r in summary["artifacts"]] == [("teacher", "ok"), ("student", "ok")]
    assert "Traceback" in (tmp_path / "run" / "stages" / "export" / "parallel-child.log").read_text()


class PackedHeadAttentionNet(nn.Module):
    """LeViT's attention (transformers' ``LevitAttention``): one Linear packs each head's q, k and v,
    ``view(b, n, heads, -1).split([key_dim, key_dim, value_dim], dim=3)`` takes them apart, and an
    attention bias per head is added to the scores."""

    def __init__(self, num_classes: int = 10, heads: int = 2, key_dim: int = 4, value_dim: int = 8) -> None:
        super().__init__()
        self.heads, self.sizes = heads, [key_dim, key_dim, value_dim]
        self.embed = nn.Conv2d(1, 16, 2, stride=2)  # 8x8 digits -> 16 tokens of 16 features
        self.qkv = nn.Linear(16, heads * sum(self.sizes))
        self.bias = nn.Parameter(torch.zeros(heads, 16, 16))
        self.proj = nn.Linear(heads * value_dim, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        b, n, _ = tokens.shape
        q, k, v = self.qkv(tokens).view(b, n, self.heads, -1).split(self.sizes, dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        attention = (q @ k.transpose(-2, -1) * self.sizes[0] ** -0.5 + self.bias).softmax(dim=-1)
        out = (attention @ v).transpose(1, 2).reshape(b, n, -1)
        return self.fc(self.proj(out).mean(dim=1))


def test_a_pte_of_packed_head_attention_runs_every_batch_size(digits8, tmp_path, monkeypatch):
    """HF LeViT's .pte ran at batch <= 2 only ("cannot run batch 3 (executorch): it accepts batches of at
    most 2 although it was exported for up to 256", docs/zoo.md at c59a50a): its attention splits the
    packed q/k/v with ``split([k, k, v], dim=3)``, ExecuTorch's split_with_sizes_copy cannot resize its
    outputs, and memory is planned for the example batch. Rewritten as slices (export_pte) the file
    runs batch 1, an odd batch and 64 with parity; without the rewrite it is the batch-2 file again."""
    from edgekd.errors import StageError
    from edgekd.export import executorch_export
    from edgekd.export.executorch_export import export_pte
    from edgekd.export.parity import check_batch_sizes

    torch.manual_seed(0)
    model = PackedHeadAttentionNet().eval()
    x = digits8.val_tensors(64)[0]
    facts = export_pte(model, x[:2], tmp_path / "attn.pte")
    loaded = get_runtime("executorch").load(tmp_path / "attn.pte", threads=1)
    assert facts["max_batch"] == 256 and loaded.max_batch == 256
    rows = check_batch_sizes(model, loaded, x, [1, 3, 64], atol=1e-4, rtol=1e-3, label="attn.pte",
                             declared_max_batch=256)
    assert [r["batch"] for r in rows] == [1, 3, 64] and all(r["max_abs_diff"] < 1e-4 for r in rows)
    del loaded
    monkeypatch.setattr(executorch_export, "_EXPORT_DECOMPOSITIONS", {})
    export_pte(model, x[:2], tmp_path / "split.pte")
    split = get_runtime("executorch").load(tmp_path / "split.pte", threads=1)
    with pytest.raises(StageError, match="cannot run batch 3 .*accepts batches of at most 2"):
        check_batch_sizes(model, split, x, [1, 3], atol=1e-4, rtol=1e-3, label="split.pte", declared_max_batch=256)


def test_global_max_pool_lowers_to_a_pte_that_runs_at_every_batch(tmp_path):
    """``F.adaptive_max_pool2d(x, 1)`` (a global max pool, as two-branch heads use) is not a Core ATen operator:
    the edge dialect refused it with ``SpecViolationError`` and the run shipped no .pte. It is exported as the
    ``max_pool2d`` it equals (kernel = stride = the input's H x W)."""
    from edgekd.export.executorch_export import export_pte

    class MaxPooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(self.conv(x))
            pooled = torch.cat([F.adaptive_max_pool2d(y, 1).flatten(1), F.adaptive_max_pool2d(y, (2, 2)).amax((2, 3))], 1)
            return self.fc(pooled)

    torch.manual_seed(0)
    model = MaxPooled().eval()
    facts = export_pte(model, torch.randn(4, 1, 8, 8), tmp_path / "m.pte")
    assert "aten_adaptive_max_pool2d_default" not in facts["non_delegated_ops"]
    loaded = get_runtime("executorch").load(tmp_path / "m.pte", threads=1)
    for batch in (1, 3, 32):
        x = torch.randn(batch, 1, 8, 8)
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(loaded.run(x.numpy()), expected, atol=1e-5)
