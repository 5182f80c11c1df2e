"""The Python API (``edgekd.compress``/``validate``/``export``/``benchmark``) and the runner end to end.

Real parts only: scikit-learn's digits scans, real torch training, torch-pruning, ONNX export and
ONNX Runtime timing, on models small enough that each run takes seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import edgekd
from edgekd.errors import DataError, EdgekdError, ModelError, RecipeError
from edgekd.pipeline.teacher import GIVEN_TEACHER
from tests.factories import dict_net

#: a quick benchmark: the figures are not the point here, that every step ran is
QUICK_BENCH = {"runtimes": ["torch", "onnxruntime"], "threads": [1], "batch_sizes": [1], "warmup": 1,
               "min_time_s": 0.0, "min_iters": 2, "memory": False, "peak": False}


def _digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(d.target)


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 150) -> torch.nn.Module:
    """What a notebook user does before calling edgekd: train their model their own way."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=torch.Generator().manual_seed(step))
        out = model(x[idx])
        loss = torch.nn.functional.cross_entropy(out["logits"] if isinstance(out, dict) else out, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_notebook_session_compresses_a_module_teacher_on_in_memory_data(tmp_path):
    """The notebook flow: a trained nn.Module teacher and in-memory datasets, no file, one call; the result
    holds the report and the gate's verdict, and nothing exits or raises for the gate."""
    x, y = _digits_tensors()
    cut = 1400
    teacher = _train(dict_net(num_classes=10, input_shape=(1, 8, 8), width=16), x[:cut], y[:cut])
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    recipe = {
        "name": "notebook",
        "teacher": {"factory": "tests.factories:dict_net", "kwargs": {"width": 16}},
        "data": {"batch_size": 32},
        "stages": [{"prune": {"ratio": 0.5, "probe": None}},
                   {"distill": {"epochs": 1}},
                   {"export": {"formats": ["onnx"], "verify": {"samples": 16}}}],
        "benchmark": QUICK_BENCH,
        "gate": {"max_accuracy_drop": 100.0},
    }
    result = edgekd.compress(recipe, teacher=teacher, data=(TensorDataset(x[:cut], y[:cut]), (x[cut:], y[cut:])),
                             out=tmp_path / "run", quiet=True)
    # the module was the teacher: not trained again, and the caller's object is untouched
    assert result.manifest["teacher"]["source"] == GIVEN_TEACHER
    # edgekd scored the teacher on the test samples exactly as given (not standardised again): the accuracy
    # the user measures on them themselves
    with torch.no_grad():
        own = 100.0 * (teacher(x[cut:])["logits"].argmax(1) == y[cut:]).double().mean().item()
    assert result.manifest["teacher"]["test_accuracy"] == pytest.approx(own, abs=1e-4)
    assert result.manifest["data"]["normalization"] is None
    assert result.manifest["data"]["dataset"] == "memory" and result.manifest["data"]["batch_size"] == 32
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    # the report: parsed and on disk, with every stage and the benchmark in it
    assert set(result.report_files) == {"json", "markdown", "html"}
    on_disk = json.loads(result.report_files["json"].read_text())
    assert [s["key"] for s in on_disk["stages"]] == ["teacher", "0-prune", "1-distill", "2-export", "benchmark"]
    assert [row.stage for row in result.report.ledger][:3] == ["teacher", "prune", "distill"]
    assert {t.runtime for t in result.report.benchmark.timings} == {"torch", "onnxruntime"}
    # the gate's verdict, evaluated once, is the one report.json records
    assert result.gate is not None and result.passed is result.gate.passed is True
    assert on_disk["gate"]["passed"] is True and on_disk["gate"]["message"] == result.gate.message
    assert result.student is not None and result.student.name == "after-benchmark.pt"


def test_validate_names_the_key_for_bad_python_input():
    """Errors from Python inputs are EdgekdErrors naming the key (no pydantic traceback, no exit)."""
    x, y = _digits_tensors()
    data = ((x[:600], y[:600]), (x[600:800], y[600:800]))
    base = {"name": "v", "teacher": {"factory": "tests.factories:dict_net"}}
    summary = edgekd.validate(base, teacher=dict_net(10, (1, 8, 8)), data=data)
    assert summary.dataset == "memory" and summary.num_classes == 10 and summary.input_shape == (1, 8, 8)
    # an unknown student architecture: exit-2 RecipeError at the key, with the valid names
    with pytest.raises(RecipeError) as err:
        edgekd.validate({**base, "student": {"model": "resnet21"}}, teacher=dict_net(10, (1, 8, 8)), data=data)
    assert err.value.key == "student" and err.value.exit_code == 2 and "resnet20" in str(err.value)
    # weights that do not fit the recipe's architecture
    with pytest.raises(RecipeError, match="teacher module passed to edgekd.compress does not fit") as err:
        edgekd.validate(base, teacher=dict_net(10, (1, 8, 8), width=8), data=data)
    assert err.value.key == "teacher" and isinstance(err.value.__cause__, ModelError)
    # data= of the wrong form, and dataset: memory without data
    with pytest.raises(RecipeError, match="data= must be"):
        edgekd.validate(base, teacher=dict_net(10, (1, 8, 8)), data=(x, y, x, y))
    with pytest.raises(EdgekdError, match="dataset: memory reads datasets passed from Python") as err:
        edgekd.validate({**base, "data": {"dataset": "memory"}}, teacher=dict_net(10, (1, 8, 8)))
    assert err.value.exit_code == 2 and isinstance(err.value.__cause__, DataError)


def test_runner_end_to_end_prune_distill_export_quantize_benchmark(tmp_path):
    """Every stage through the runner on a tiny model: the manifest, artifacts, ledger, benchmark and gate
    agree, and the run's student files load."""
    from edgekd.models.portable import load_portable

    recipe = {
        "name": "e2e", "seed": 0,
        "data": {"dataset": "digits", "image_size": 8, "batch_size": 64},
        "teacher": {"model": "mlp", "kwargs": {"hidden": 48}, "train": {"epochs": 3, "optimizer": "adamw",
                                                                        "lr": 0.01}},
        "stages": [{"prune": {"ratio": 0.5, "probe": None}},
                   {"distill": {"epochs": 2}},
                   {"export": {"formats": ["onnx"], "verify": {"samples": 16}}},
                   {"quantize": {"method": {"kind": "ort_static", "calibration": {"samples": 64}},
                                 "max_accuracy_drop": 100.0, "keep_if_faster": False,
                                 "speed": {"min_time_s": 0.05, "min_iters": 2}}}],
        "benchmark": QUICK_BENCH,
        "gate": {"max_accuracy_drop": 0.0},
    }
    result = edgekd.compress(recipe, out=tmp_path / "run", quiet=True)
    stages = result.manifest["stages"]
    assert [(s["key"], s["status"]) for s in stages] == [
        ("teacher", "done"), ("0-prune", "done"), ("1-distill", "done"), ("2-export", "done"),
        ("3-quantize", "done"), ("benchmark", "done")]
    kinds = {(a["role"], a["fmt"], a["precision"]) for a in result.manifest["artifacts"] if a["status"] == "ok"}
    assert {("student", "onnx", "fp32"), ("teacher", "onnx", "fp32"), ("student", "onnx", "int8")} <= kinds
    rows = {row["stage"]: row for row in result.manifest["ledger"]}
    assert rows["prune"]["params"] < rows["teacher"]["params"]
    assert rows["distill"]["test_accuracy"] is not None and rows["quantize"]["notes"]["precision"] == "int8"
    student, meta = load_portable(result.student)
    assert sum(p.numel() for p in student.parameters()) == rows["prune"]["params"] and meta["num_classes"] == 10
    # the benchmark scored every student file on the test split against the teacher
    drops = {(d.runtime, d.model) for d in result.report.accuracy_drops}
    assert ("onnxruntime", "student-int8") in drops or any("int8" in m for _, m in drops)
    # the gate was evaluated once, in the report: a 0-point gate fails exactly when some student lost accuracy
    worst = max(d.drop for d in result.report.accuracy_drops if d.split == "test")
    assert result.gate is not None and result.passed is (worst <= 0.0)
    assert json.loads(result.report_files["json"].read_text())["gate"]["passed"] is result.passed
    np.testing.assert_allclose(result.gate.worst.drop, worst)
    # the file commands of the API on the run's outputs: export the final student, time it against the teacher
    onnx = edgekd.export(result.student, "onnx", out=tmp_path / "files" / "student.onnx")
    assert callable(edgekd.export) and onnx.is_file() and onnx.suffix == ".onnx"
    timed = edgekd.benchmark(onnx, against=result.run_dir / "artifacts" / "teacher.onnx", threads=[1],
                             batch_sizes=[1], warmup=1, min_time_s=0.0, min_iters=2, memory=False, peak=False,
                             quiet=True)
    assert {(t.label, t.runtime) for t in timed.timings} >= {("student", "onnxruntime"), ("teacher", "onnxruntime")}
    assert all(t.latency is not None and t.latency.p50_ms > 0 for t in timed.timings)
