"""Weight sharing (the ``cluster`` stage) against the FP32 and INT8 files: size and accuracy (issue 17).

Per seed (3 by default) on MNIST-1D (official 4000/1000 split, val held out of train): an MLP teacher
(2 x ``--hidden``) is trained on shifted signals; it is then clustered per layer to k = 16 and 256
shared values (the stage's k-means and ``--epochs`` of distillation from the FP32 model with the
assignments fixed). Each model is exported as edgekd ships it (one self-contained ONNX file) and
compared with ONNX Runtime's dynamic INT8 quantization of the FP32 file (per-channel weights).
Reported: test top-1 of each file run by ONNX Runtime, file bytes raw and gzipped (level 9), and
the ideal packed size of the clustered weights (log2(k)-bit indices + float32 codebook). Each clustered
model also gets the file the export stage writes beside its ``.onnx`` (``edgekd.export.codebook``: every
shared weight as a uint8 index and a float32 codebook, which ONNX Runtime folds back at load).

    python tools/bench_cluster.py                 # 3 seeds (a few minutes idle)
"""

from __future__ import annotations

import argparse
import copy
import gzip
import platform
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from rich.console import Console

from edgekd.cluster.config import ClusterConfig
from edgekd.cluster.kmeans import kmeans_1d, share_weights, snap
from edgekd.cluster.stage import clustered_layers
from edgekd.data import load_data
from edgekd.data.config import Mnist1dData
from edgekd.distill.config import KDTerm
from edgekd.distill.objective import DistillObjective
from edgekd.export.codebook import write_codebook_onnx
from edgekd.export.onnx_export import export_onnx
from edgekd.models import build_model
from edgekd.train.augment import AugmentConfig
from edgekd.train.config import TrainConfig
from edgekd.train.objectives import CrossEntropyObjective, Objective
from edgekd.train.trainer import fit

CPU = torch.device("cpu")
QUIET = Console(quiet=True)


def _train(model: torch.nn.Module, objective: Objective, data, config: TrainConfig, seed: int) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        fit(model, objective, data, config, Path(workdir), device=CPU, seed=seed, console=QUIET)
    model.eval()


def clustered(teacher: torch.nn.Module, data, k: int, args, seed: int) -> tuple[torch.nn.Module, int]:
    """The teacher with k shared values per layer, distilled from it with the assignments fixed."""
    model = copy.deepcopy(teacher)
    config = ClusterConfig(k=k)
    shared = []
    for _, module in clustered_layers(model, config):
        c = kmeans_1d(module.weight, k)
        shared.append((module, c.index, share_weights(module, c)))
    if args.epochs:
        _train(model, DistillObjective(teacher, [KDTerm(kind="kd")], temperature=4.0, alpha=0.9), data,
               TrainConfig(epochs=args.epochs, optimizer="adamw", lr=1e-3, weight_decay=0.0, batch_size=100,
                           keep="last", warmup_epochs=0.0), seed)
    packed = 0
    for module, index, handle in shared:
        handle.remove()
        codebook = snap(module, index)
        packed += -(-index.numel() * max(1, (len(codebook) - 1).bit_length()) // 8) + 4 * len(codebook)
    return model.eval(), packed


def onnx_accuracy(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x.numpy().astype(np.float32)})[0]
    return float((logits.argmax(1) == y.numpy()).mean() * 100)


def run_seed(seed: int, args, tmp: Path) -> dict[str, dict]:
    data = load_data(Mnist1dData(dataset="mnist1d"), seed=seed)
    torch.manual_seed(seed)
    teacher = build_model("mlp", num_classes=data.num_classes, input_shape=data.input_shape, hidden=args.hidden)
    _train(teacher, CrossEntropyObjective(), data,
           TrainConfig(epochs=args.teacher_epochs, optimizer="adamw", lr=3e-3, weight_decay=1e-2, batch_size=100,
                       augment=AugmentConfig(shift=3)), seed)
    example = data.example_batch(1)
    files: dict[str, Path] = {}
    packed: dict[str, int] = {}
    files["fp32"] = tmp / f"fp32-{seed}.onnx"
    export_onnx(teacher, example, files["fp32"])
    files["int8 (ORT dynamic)"] = tmp / f"int8-{seed}.onnx"
    quantize_dynamic(str(files["fp32"]), str(files["int8 (ORT dynamic)"]), weight_type=QuantType.QInt8,
                     per_channel=True)
    for k in args.k:
        model, packed[f"k={k}"] = clustered(teacher, data, k, args, seed)
        files[f"k={k}"] = tmp / f"k{k}-{seed}.onnx"
        export_onnx(model, example, files[f"k={k}"])
        # what the export stage writes beside it: each shared weight as a uint8 index + float32 codebook
        files[f"k={k}, codebook .onnx"] = tmp / f"k{k}-{seed}.codebook.onnx"
        write_codebook_onnx(files[f"k={k}"], files[f"k={k}, codebook .onnx"])
    x, y = data.test_tensors()
    out = {}
    for name, path in files.items():
        raw = path.read_bytes()
        out[name] = {"test": onnx_accuracy(path, x, y), "bytes": len(raw),
                     "gzip": len(gzip.compress(raw, compresslevel=9)), "packed": packed.get(name)}
    return out


def _ms(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=3, help="distillation epochs with assignments fixed")
    parser.add_argument("--k", nargs="+", type=int, default=[16, 256])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# weight sharing vs FP32 / INT8 files, MNIST-1D MLP 2x{args.hidden}; {platform.processor() or platform.machine()}"
          f", torch {torch.__version__}, onnxruntime {ort.__version__}; teacher {args.teacher_epochs} epochs, "
          f"clustered + {args.epochs} KD epochs")
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_seed(seed, args, Path(tmp)) for seed in args.seeds]
    fp32_gzip = statistics.mean(r["fp32"]["gzip"] for r in runs)
    print("\n| file | test top-1 % (ORT) | ONNX bytes | gzip bytes | gzip vs FP32 gzip | packed weights bytes |")
    print("|---|---|---|---|---|---|")
    for name in runs[0]:
        rows = [r[name] for r in runs]
        gz = statistics.mean(r["gzip"] for r in rows)
        packed = rows[0]["packed"]
        print(f"| {name} | {_ms([r['test'] for r in rows])} | {statistics.mean(r['bytes'] for r in rows):,.0f} | "
              f"{gz:,.0f} | {fp32_gzip / gz:.2f}x smaller | {'—' if packed is None else f'{packed:,}'} |")
    print("\nper seed test top-1: " + "; ".join(
        f"seed {s}: " + ", ".join(f"{n} {r[n]['test']:.2f}" for n in r) for s, r in zip(args.seeds, runs, strict=True)))


if __name__ == "__main__":
    main()
