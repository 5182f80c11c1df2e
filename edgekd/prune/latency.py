"""Measured latency of torch models on ONNX Runtime CPU, timed side by side.

Two exports: the report's before/after figures use edgekd's shipping exporter
(``edgekd.export.onnx_export.export_onnx``: torch.export, simplified, checked), so they time the
file a user deploys. The pruning search times many candidates, so it uses the TorchScript
exporter: about 0.4 s for ResNet-56 where the torch.export-based one takes about 9 s on this
machine, and ONNX Runtime ran both graphs at the same speed (98.5 vs 98.5 ms, batch 32,
1 thread). Models run on edgekd's ``onnxruntime`` runtime, timed interleaved in one process
(``edgekd.bench.latency.measure_interleaved``) so machine drift hits every model alike.
"""

from __future__ import annotations

import functools
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgekd.bench.latency import LatencyStats, measure_interleaved
from edgekd.errors import StageError
from edgekd.export.onnx_export import export_onnx
from edgekd.runtimes.registry import get_runtime


def export_for_timing(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """ONNX file with a dynamic batch axis, for timing only (see the module docstring)."""
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's own deprecation notice
            torch.onnx.export(model, (example[:1].contiguous(),), str(path), opset_version=18, dynamo=False,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as exc:  # noqa: BLE001 - any exporter failure is reported the same way
        raise StageError(f"could not export the model to ONNX for timing: {exc}",
                         hint="the model must be traceable by torch.onnx.export") from exc
    finally:
        model.train(was_training)
    return path


def export_shipping(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """The ONNX file edgekd ships (torch.export, simplified, checked)."""
    export_onnx(model, example, path, opset=18, dynamic_batch=True, simplify=True)
    return path


Exporter = Callable[[nn.Module, torch.Tensor, Path], Path]


def measure_models(models: dict[str, nn.Module], batch: torch.Tensor, *, threads: int, min_time_s: float,
                   min_iters: int = 5, runtime: str = "onnxruntime",
                   export: Exporter = export_for_timing) -> dict[str, LatencyStats]:
    """Export each model, load it on ``runtime`` with ``threads`` threads, time them side by side."""
    return measure_models_at(models, [batch], threads=threads, min_time_s=min_time_s, min_iters=min_iters,
                             runtime=runtime, export=export)[0]


def measure_models_at(models: dict[str, nn.Module], batches: list[torch.Tensor], *, threads: int,
                      min_time_s: float, min_iters: int = 5, runtime: str = "onnxruntime",
                      export: Exporter = export_for_timing) -> list[dict[str, LatencyStats]]:
    """Like ``measure_models`` for several batches (sizes), exporting and loading each model once."""
    engine = get_runtime(runtime)
    with tempfile.TemporaryDirectory(prefix="edgekd-prune-time-") as tmp:
        loaded = {name: engine.load(export(model, batches[0], Path(tmp) / f"{i}.onnx"), threads)
                  for i, (name, model) in enumerate(models.items())}
        results = []
        for batch in batches:
            inputs = batch.contiguous().numpy().astype(np.float32)
            calls = {name: functools.partial(m.run, inputs) for name, m in loaded.items()}
            results.append(measure_interleaved(calls, warmup=2, min_time_s=min_time_s, min_iters=min_iters,
                                               batch_size=len(inputs)))
        return results


def timing_batch(samples: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``batch_size`` real samples (repeated when there are fewer)."""
    reps = -(-batch_size // len(samples))
    return samples.repeat(reps, *([1] * (samples.dim() - 1)))[:batch_size].contiguous()
