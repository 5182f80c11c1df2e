"""``edgekd.compress(..., quiet=True)`` prints nothing: the runner's lines, the trainers' epoch lines and
the benchmark's lines all go to the run's console (``RunContext.console``), which ``quiet`` silences.

Real parts only: scikit-learn digits, real training, torch-pruning and a real (tiny) benchmark.
"""

from __future__ import annotations

import warnings

import edgekd


def test_quiet_compress_prints_nothing(tmp_path, capfd):
    recipe = {
        "name": "quiet", "seed": 0,
        "data": {"dataset": "digits", "image_size": 8, "batch_size": 64},
        "teacher": {"model": "mlp", "kwargs": {"hidden": 32},
                    "train": {"epochs": 2, "optimizer": "adamw", "lr": 0.01}},
        "stages": [{"prune": {"ratio": 0.25, "probe": None}},
                   {"distill": {"epochs": 1}}, {"export": {"formats": ["onnx"]}}],
        "benchmark": {"runtimes": ["torch"], "threads": [1], "batch_sizes": [1], "warmup": 1,
                      "min_time_s": 0.0, "min_iters": 2, "memory": False, "peak": False},
    }
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # library warnings are not edgekd's lines
        result = edgekd.compress(recipe, out=tmp_path / "run", quiet=True)
    out, err = capfd.readouterr()
    # the run did train (so the trainers had epoch lines to print) and benchmark
    assert [s["status"] for s in result.manifest["stages"]] == ["done"] * 5
    assert result.report.benchmark is not None
    assert out == "", out
    assert err == "", err
