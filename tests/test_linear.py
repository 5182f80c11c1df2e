"""The built-in ``linear`` student (softmax regression) and ``recipes/mlp_to_linear.yaml``, on real MNIST-1D."""

from __future__ import annotations

from pathlib import Path

import torch

import edgekd
from edgekd.models import build_model
from edgekd.models.portable import load_portable

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "mlp_to_linear.yaml"


def test_linear_student_is_one_linear_over_the_flattened_input():
    model = build_model("linear", num_classes=10, input_shape=(1, 40))
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 1 and sum(p.numel() for p in model.parameters()) == 40 * 10 + 10
    x = torch.randn(5, 1, 40)
    torch.testing.assert_close(model(x), x.flatten(1) @ layers[0].weight.T + layers[0].bias)
    image = build_model("linear", num_classes=3, input_shape=(2, 4, 4))
    assert image(torch.randn(2, 2, 4, 4)).shape == (2, 3)


def test_mlp_to_linear_recipe_validates_and_a_tiny_run_exports_the_linear_student(tmp_path):
    """The recipe as shipped validates; shortened, it trains the MLP teacher, distills the linear student,
    exports it with parity checked and reloads it from its portable checkpoint."""
    edgekd.validate(RECIPE)
    quick = ["teacher.train.epochs=2", "stages.0.distill.epochs=2", "stages.1.export.formats=[onnx]",
             "benchmark.runtimes=[onnxruntime]", "benchmark.batch_sizes=[1]", "benchmark.min_time_s=0.0",
             "benchmark.warmup=1", "benchmark.min_iters=2"]
    result = edgekd.compress(RECIPE, out=tmp_path / "run", overrides=quick, quiet=True)
    assert [s["status"] for s in result.manifest["stages"]] == ["done"] * len(result.manifest["stages"])
    onnx = [a for a in result.manifest["artifacts"] if a["role"] == "student" and a["fmt"] == "onnx"]
    assert onnx and onnx[0]["status"] == "ok"
    student, meta = load_portable(result.student)
    assert meta["spec"]["model"] == "linear" and sum(p.numel() for p in student.parameters()) == 410
    distill = next(r for r in result.manifest["ledger"] if r["stage"] == "distill")
    assert distill["test_accuracy"] > 100 / 10  # two epochs already lift it above chance
