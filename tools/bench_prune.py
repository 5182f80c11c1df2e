"""Pruning benchmark: counted and measured cost of ResNet-56 and MobileNetV2 pruned 30/50/70%.

For each model, scope, importance criterion and channel ratio it prints parameters, MACs
(torch-pruning's counter), the MACs ratio, and the measured ONNX Runtime speed-up (CPU,
1 thread, batch 1 and 32; teacher and student timed side by side, interleaved), plus the
student's top-1 right after pruning and BatchNorm re-estimation (no training) on real digits
scans at 32x32.

    python tools/bench_prune.py            # everything (several minutes on 2 cores)
    python tools/bench_prune.py --quick    # l2 per-layer only, shorter timing, no training

Structures that come out identical (per-layer scope ranks within each layer, so every
criterion keeps the same channel counts) are timed once.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch
import torch.nn.functional as F

from edgekd.bench.latency import paired_speedup
from edgekd.data import digits_bundle
from edgekd.models.batchnorm import recalibrate_batchnorm
from edgekd.models.evaluate import top1_accuracy
from edgekd.models.spec import ModelSpec
from edgekd.models.stats import count_params_macs
from edgekd.prune.config import PruneConfig
from edgekd.prune.latency import measure_models, timing_batch
from edgekd.prune.targets import PruneEnv, prune_at_ratio

CRITERIA = ["l1", "l2", "bn_scale", "lamp", "taylor", "random"]
RATIOS = [0.3, 0.5, 0.7]
MODELS = ["resnet56", "mobilenetv2"]
BATCH_SIZES = [1, 32]


def train_briefly(model, data, epochs: int) -> None:
    """A short real training run so weights, BatchNorm statistics and importance mean something."""
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)  # ResNet-56: 92% val top-1 after 3 epochs
    model.train()
    for epoch in range(epochs):
        for x, y in data.train_loader(64, seed=epoch):
            opt.zero_grad()
            F.cross_entropy(model(x.contiguous()), y).backward()
            opt.step()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="l2 + per-layer only, short timing, no training")
    parser.add_argument("--epochs", type=int, default=3, help="teacher training epochs on digits (full run)")
    parser.add_argument("--min-time", type=float, default=None, help="timed seconds per model and batch size")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--round-to", type=int, default=8)
    args = parser.parse_args()

    torch.set_num_threads(1)
    criteria = ["l2"] if args.quick else CRITERIA
    scopes = ["per_layer"] if args.quick else ["per_layer", "global"]
    min_time = args.min_time or (0.3 if args.quick else 1.0)
    data = digits_bundle(image_size=32)
    samples = data.calibration_batch(64)
    val_x, val_y = data.val_tensors()
    print(f"# pruning benchmark: digits 1x32x32, ONNX Runtime CPU, 1 thread, batch {BATCH_SIZES}, "
          f"round_to {args.round_to}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}")
    header = (f"{'model':<12}{'scope':<10}{'criterion':<10}{'ratio':>6}{'params':>10}{'MMACs':>8}{'MACs x':>7}"
              + "".join(f"{'t bs' + str(b):>10}{'s bs' + str(b):>10}{'speedup':>8}" for b in BATCH_SIZES)
              + f"{'top1':>7}")

    for model_name in args.models:
        torch.manual_seed(0)
        teacher = ModelSpec(model=model_name).build(data.num_classes, data.input_shape)
        started = time.perf_counter()
        if not args.quick:
            train_briefly(teacher, data, args.epochs)
        teacher.eval()
        t_params, t_macs = count_params_macs(teacher, samples)
        t_acc = top1_accuracy(teacher, val_x, val_y)
        print(f"\n## {model_name}: {t_params:,} params, {t_macs / 1e6:.1f} MMACs, top-1 {t_acc:.1f}% "
              f"({'untrained' if args.quick else f'{args.epochs} epoch(s), {time.perf_counter() - started:.0f} s'})")
        print(header)
        timed_by_shape: dict[tuple, dict[int, tuple[float, float]]] = {}
        for scope in scopes:
            for ratio in RATIOS:
                for criterion in criteria:
                    cfg = PruneConfig(ratio=ratio, scope=scope, importance=criterion, round_to=args.round_to,
                                      probe=None)
                    student = copy.deepcopy(teacher)
                    env = PruneEnv(config=cfg, samples=samples, teacher=teacher,
                                   gradient_batches=lambda: data.train_loader(64))
                    prune_at_ratio(student, env, ratio)
                    student.eval()
                    params, macs = count_params_macs(student, samples)
                    shape = tuple(tuple(p.shape) for p in student.state_dict().values())
                    if shape not in timed_by_shape:
                        timed_by_shape[shape] = {}
                        for bs in BATCH_SIZES:
                            timed = measure_models({"teacher": teacher, "student": student},
                                                   timing_batch(samples, bs), threads=1, min_time_s=min_time)
                            timed_by_shape[shape][bs] = (timed["teacher"].p50_ms, timed["student"].p50_ms,
                                                         paired_speedup(timed["teacher"], timed["student"]))
                    cells = "".join(f"{t:>10.2f}{s:>10.2f}{x:>7.2f}x" for t, s, x in
                                    (timed_by_shape[shape][b] for b in BATCH_SIZES))
                    recalibrate_batchnorm(student, data.train_loader(64), 8)
                    acc = top1_accuracy(student.eval(), val_x, val_y)
                    print(f"{model_name:<12}{scope:<10}{criterion:<10}{ratio:>6.1f}{params:>10,}{macs / 1e6:>8.1f}"
                          f"{t_macs / macs:>6.2f}x{cells}{acc:>6.1f}%", flush=True)
    print("\nlatency columns: ms per batch, p50 (t = teacher, s = student, timed side by side); speedup = "
          "median of teacher/student over back-to-back calls; top1 = right after pruning and BatchNorm "
          "re-estimation (8 batches), before any recovery training")


if __name__ == "__main__":
    main()
