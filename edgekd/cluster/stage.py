"""The ``cluster`` stage: k shared values per layer (k-means), distilled with the assignments fixed.

What it buys is storage: a layer of n float32 weights becomes n indices of log2(k) bits and a
k-entry codebook, and even stored as float32 (as ONNX holds it) a file with k distinct values per
layer compresses several times better under gzip, which is what a download or an app bundle pays.
What it does not buy on these runtimes is latency: ONNX Runtime and ExecuTorch compute with the
float weights. The report gives the ONNX file's size raw and gzipped before and after.
"""

from __future__ import annotations

import copy
import gzip
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekd.cluster.config import ClusterConfig
from edgekd.cluster.kmeans import kmeans_1d, share_weights, snap
from edgekd.distill.config import KDTerm
from edgekd.distill.objective import DistillObjective
from edgekd.errors import RecipeError, StageError
from edgekd.export.onnx_export import export_onnx
from edgekd.fileio import atomic_write_json
from edgekd.models.adapter import close_names_hint, find_layer, layer_names
from edgekd.models.evaluate import top1_accuracy
from edgekd.models.stats import count_params_macs
from edgekd.stage.base import Stage, register_stage
from edgekd.stage.context import LedgerRow, RunContext, ValidationContext
from edgekd.train.config import TrainConfig
from edgekd.train.trainer import fit


def clustered_layers(model: nn.Module, config: ClusterConfig) -> list[tuple[str, nn.Module]]:
    """(user name, module) of every Linear/Conv layer the config clusters, in module order."""
    kinds: tuple[type, ...] = ()
    if "linear" in config.layers:
        kinds += (nn.Linear,)
    if "conv" in config.layers:
        kinds += (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    ignored = {id(find_layer(model, n)) for n in config.ignored_layers}
    out = []
    for name in layer_names(model):
        module = find_layer(model, name)
        if isinstance(module, kinds) and id(module) not in ignored and module.weight.numel() >= config.min_weights:
            out.append((name, module))
    return out


def onnx_sizes(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Bytes of the model's shipped ONNX file, raw and gzipped (level 9)."""
    with tempfile.TemporaryDirectory(prefix="edgekd-cluster-") as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(copy.deepcopy(model).cpu().eval(), example.cpu(), path)
        raw = path.read_bytes()
    return {"onnx_bytes": len(raw), "onnx_gzip_bytes": len(gzip.compress(raw, compresslevel=9))}


@register_stage(ClusterConfig)
class ClusterStage(Stage[ClusterConfig]):
    name = "cluster"
    main_process_only = False

    def check(self, ctx: ValidationContext) -> None:
        for name in self.config.ignored_layers:
            if find_layer(ctx.student, name) is None:
                raise RecipeError(f"ignored layer {name!r} is not a module of the student",
                                  key="cluster.ignored_layers", hint=close_names_hint(ctx.student, name))
        if not clustered_layers(ctx.student, self.config):
            raise RecipeError(f"no layer to cluster: no {'/'.join(self.config.layers)} layer with at least "
                              f"{self.config.min_weights} weights outside ignored_layers", key="cluster",
                              hint="lower min_weights or remove the cluster stage")

    def run(self, ctx: RunContext) -> None:
        cfg = self.config
        example = ctx.data.example_batch(1)
        student = ctx.student
        sizes_before = onnx_sizes(student, example)
        accuracy_before = top1_accuracy(student, *ctx.data.val_tensors())
        layers = clustered_layers(student, cfg)
        shared = []
        for name, module in layers:
            clustered = kmeans_1d(module.weight, cfg.k, cfg.iterations)
            shared.append((name, module, clustered.index, share_weights(module, clustered)))
        accuracy_clustered = top1_accuracy(student, *ctx.data.val_tensors())
        history: list[dict[str, float]] = []
        try:
            if cfg.epochs:
                train = TrainConfig(epochs=cfg.epochs, optimizer="adamw", lr=cfg.lr, weight_decay=0.0,
                                    batch_size=cfg.batch_size, keep="last", warmup_epochs=0.0)
                objective = DistillObjective(ctx.teacher, [KDTerm(kind="kd")], temperature=cfg.temperature,
                                             alpha=cfg.alpha)
                result = fit(student, objective, ctx.data, train, ctx.stage_dir(self.name), device=ctx.device,
                             resume=ctx.resume, label=self.name, seed=ctx.recipe.seed, from_weights=True,
                             console=ctx.console)
                history = result.history
        finally:
            for *_, handle in shared:
                handle.remove()
        rows = []
        for name, module, index, _ in shared:
            codebook = snap(module, index)  # float drift of the shared updates, if any, is put back on the mean
            distinct = int(torch.unique(module.weight.detach()).numel())
            if distinct > cfg.k:
                raise StageError(f"cluster: layer {name!r} has {distinct} distinct weights after training, above k={cfg.k}")
            n = module.weight.numel()
            bits = max(1, math.ceil(math.log2(max(2, len(codebook)))))
            rows.append({"layer": name, "type": type(module).__name__, "weights": n, "distinct": distinct,
                         "index_bits": bits, "packed_bytes": math.ceil(n * bits / 8) + 4 * len(codebook),
                         "float_bytes": 4 * n})
        student.eval()
        accuracy = top1_accuracy(student, *ctx.data.val_tensors())
        sizes_after = onnx_sizes(student, example)
        params, macs = count_params_macs(student, example.to(next(student.parameters()).device))
        data: dict[str, Any] = {
            "k": cfg.k,
            "layers": rows,
            "before": sizes_before,
            "after": sizes_after,
            "gzip_ratio": round(sizes_before["onnx_gzip_bytes"] / sizes_after["onnx_gzip_bytes"], 3),
            "packed_weight_bytes": sum(r["packed_bytes"] for r in rows),
            "float_weight_bytes": sum(r["float_bytes"] for r in rows),
            "val_accuracy_before": round(accuracy_before, 3),
            "val_accuracy_clustered": round(accuracy_clustered, 3),
            "val_accuracy_after": round(accuracy, 3),
            "history": history,
        }
        ctx.report_data["cluster"] = data
        report_file = ctx.stage_dir(self.name) / "cluster.json"
        atomic_write_json(report_file, data)
        ctx.stage_outputs.append(report_file)
        ctx.ledger.append(LedgerRow(stage="cluster", params=params, macs=macs, val_accuracy=accuracy,
                                    notes={"k": cfg.k, "layers": len(rows), "onnx_gzip_ratio": data["gzip_ratio"]}))
        ctx.console.print(f"cluster: {len(rows)} layer(s) at k={cfg.k}; ONNX gzip {sizes_before['onnx_gzip_bytes']:,} -> "
                          f"{sizes_after['onnx_gzip_bytes']:,} bytes ({data['gzip_ratio']:.2f}x); val top-1 "
                          f"{accuracy_before:.2f}% -> {accuracy_clustered:.2f}% clustered -> {accuracy:.2f}% after "
                          f"{cfg.epochs} epoch(s)")
