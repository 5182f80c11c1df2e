"""The ``cluster`` stage: 1-D k-means, weight sharing through training, recipe errors, and a run end to end
on real data (scikit-learn's digits) with the gzipped ONNX size before and after. Real torch and ONNX."""

from __future__ import annotations

import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import edgekd
from edgekd.cluster.kmeans import kmeans_1d, share_weights, snap
from edgekd.errors import RecipeError
from edgekd.models.portable import load_portable


def test_kmeans_finds_the_clumps_and_keeps_at_most_k_values():
    torch.manual_seed(0)
    centres = torch.tensor([-0.5, 0.1, 0.8])
    weight = (centres[torch.randint(0, 3, (40, 30))] + 0.01 * torch.randn(40, 30))
    clustered = kmeans_1d(weight, 3)
    torch.testing.assert_close(clustered.codebook, centres, atol=0.01, rtol=0)
    assert clustered.index.shape == weight.shape
    assert (clustered.weight() - weight).abs().max() < 0.06
    assert torch.unique(kmeans_1d(torch.randn(64, 64), 16).weight()).numel() <= 16


def test_shared_weights_stay_shared_through_adamw_steps():
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    clustered = kmeans_1d(layer.weight, 8)
    handle = share_weights(layer, clustered)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.01)
    x, y = torch.randn(64, 32), torch.randn(64, 16)
    before = layer.weight.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(layer(x), y).backward()
        opt.step()
    handle.remove()
    assert not torch.equal(before, layer.weight)  # the centroids moved
    for c in range(len(clustered.codebook)):
        values = layer.weight.detach()[clustered.index == c]
        assert values.numel() == 0 or torch.unique(values).numel() == 1  # one value per cluster
    codebook = snap(layer, clustered.index)
    assert codebook.numel() == 8 and torch.unique(layer.weight.detach()).numel() <= 8


RECIPE = textwrap.dedent("""\
    name: cluster-errors
    data: {dataset: digits, image_size: 8}
    teacher:
      model: mlp
      kwargs: {hidden: 32}
      train: {epochs: 1}
    stages:
      - cluster:
          k: 16
          ignored_layers: [head]
    """)


@pytest.mark.parametrize(("old", "new", "words"), [
    ("k: 16", "k: 1", ["stages.0.cluster.k", "greater than or equal to 2"]),
    ("[head]", "[haed]", ["ignored layer 'haed'", "stages.0.cluster.ignored_layers", "did you mean"]),
])
def test_recipe_errors_name_file_line_and_key(tmp_path, old, new, words):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.replace(old, new))
    with pytest.raises(RecipeError) as info:
        edgekd.validate(path)
    message = str(info.value)
    assert str(path) in message and info.value.line in (9, 10), message
    for word in words:
        assert word in message, message


def test_cluster_end_to_end_on_digits_shrinks_the_gzipped_onnx(tmp_path):
    recipe = {
        "name": "cluster-e2e", "seed": 0,
        "data": {"dataset": "digits", "image_size": 8, "batch_size": 64},
        "teacher": {"model": "mlp", "kwargs": {"hidden": 128},
                    "train": {"epochs": 3, "optimizer": "adamw", "lr": 0.01}},
        "stages": [{"cluster": {"k": 16, "epochs": 1}},
                   {"export": {"formats": ["onnx"], "verify": {"samples": 16}}}],
        "benchmark": {"runtimes": ["onnxruntime"], "threads": [1], "batch_sizes": [1], "warmup": 1,
                      "min_time_s": 0.0, "min_iters": 2, "memory": False, "peak": False},
    }
    result = edgekd.compress(recipe, out=tmp_path / "run", quiet=True)
    assert [s["status"] for s in result.manifest["stages"]] == ["done"] * len(result.manifest["stages"])
    data = result.report.stage_data["0-cluster"]
    assert data["after"]["onnx_gzip_bytes"] * 2 < data["before"]["onnx_gzip_bytes"]
    assert all(row["distinct"] <= 16 for row in data["layers"]) and len(data["layers"]) == 3
    markdown = result.report_files["markdown"].read_text()
    assert "Weight sharing (cluster): layers (0-cluster)" in markdown
    assert "k = 16 shared values per layer; ONNX file raw" in markdown
    assert "| student | onnx, index + codebook | artifacts/student.codebook.onnx | ok: 3 shared weight" in markdown
    student, _ = load_portable(result.student)
    for module in student.modules():
        if isinstance(module, nn.Linear):
            assert torch.unique(module.weight).numel() <= 16
    onnx = next(a for a in result.manifest["artifacts"] if a["role"] == "student" and a["fmt"] == "onnx")
    assert onnx["status"] == "ok"
    # the shared weights on disk: a uint8 index + codebook per clustered layer, the same outputs in ONNX Runtime
    plain = result.run_dir / onnx["path"]
    codebook = plain.with_name("student.codebook.onnx")
    assert onnx["info"]["codebook_layers"] == 3 and onnx["info"]["codebook_bytes"] == codebook.stat().st_size
    assert codebook.stat().st_size * 3 < plain.stat().st_size
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    outputs = [ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
               for f in (plain, codebook)]
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    assert not (plain.parent / "teacher.codebook.onnx").exists()  # a model without shared weights gets none


def test_codebook_onnx_keeps_a_clustered_conv_shared_after_its_batchnorm_is_folded(tmp_path):
    """Export folds a BatchNorm into the conv before it, scaling each output channel of a weight with 16 shared
    values by its own factor: the ONNX weight has far more than 256 values in all, but at most 16 per channel.
    The codebook file stores it per channel (uint8 index + a codebook row per channel), computes the same outputs
    in ONNX Runtime, and ONNX Runtime folds the lookup away when it loads the file."""
    from edgekd.export.codebook import write_codebook_onnx
    from edgekd.export.onnx_export import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3),
                          nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Conv2d):
                values = torch.randn(16)
                module.weight.copy_(values[torch.randint(0, 16, module.weight.shape)])
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 2.0)
    model.eval()
    plain = tmp_path / "m.onnx"
    export_onnx(model, torch.randn(1, 3, 8, 8), plain)
    folded = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(plain)).graph.initializer}
    widest = max(folded.values(), key=lambda a: a.size)
    assert np.unique(widest).size > 256 and max(np.unique(r).size for r in widest.reshape(32, -1)) <= 16
    facts = write_codebook_onnx(plain, tmp_path / "m.codebook.onnx")
    assert facts is not None and facts["codebook_layers"] >= 1
    assert facts["codebook_bytes"] < 0.5 * facts["float_bytes"]
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    outputs = [ort.InferenceSession(str(f), options if f.name.startswith("m.codebook") else ort.SessionOptions(),
                                    providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
               for f in (plain, tmp_path / "m.codebook.onnx")]
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert not ops & {"Gather", "GatherElements", "Cast"}  # folded into float weights at load
