"""Low-rank factorization against channel pruning at equal measured latency (issue 17).

Per seed (3 by default), one of two families (``--family``):

* ``mlp``: MNIST-1D (official 4000/1000 split, val held out of train), an MLP teacher (2 hidden layers,
  ``--hidden``) trained on shifted signals (AdamW); students distilled with AdamW at T=4, alpha 0.9;
* ``resnet``: digits at 16x16 (1169/269/359), the built-in CIFAR ResNet-20 at ``--width`` trained with
  SGD; its 3x3 convs factorize by spatial or channel SVD, and students recover with the distill stage's
  defaults from trained weights (SGD lr 0.01, 0.2-epoch warm-up, batch 32, T=4, alpha 0.5).

Two students are made from the teacher and recovered by the same distillation (same epochs,
optimizer, schedule, augmentation):

* ``lowrank``: the ``lowrank`` stage's planner (truncated SVD, one energy threshold for every layer,
  searched to meet ``--macs-reduction``, ranks rounded to ``--round-to``);
* ``pruned``: the ``prune`` stage's search (torch-pruning, L2, per layer, round_to 8) for the speed-up
  over the teacher that the low-rank student measured (ONNX Runtime, 1 thread, batch 32): the
  channel-pruned student of about equal measured latency.

Reported per model: test top-1 (the test split, which no choice reads; val picks nothing here but
the kept epoch, the last), params and MACs (torch-pruning's tracer), the shipped ONNX file's size,
and ONNX Runtime latency (CPU EP, 1 intra-op thread, batch 1 and 32; the three models exported as
edgekd ships them and timed interleaved in one process so load drift hits them alike; speed-up =
median of the per-round ratios).

    python tools/bench_lowrank.py                         # 3 seeds, hidden 256 (about 5-10 min idle)
    python tools/bench_lowrank.py --seeds 0 --epochs 5    # a quick look
    python tools/bench_lowrank.py --family resnet         # ResNet-20 on digits 16x16
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from edgekd.bench.latency import paired_speedup
from edgekd.data import load_data
from edgekd.data.config import DigitsData, Mnist1dData
from edgekd.distill.config import KDTerm
from edgekd.distill.objective import DistillObjective
from edgekd.errors import EdgekdError
from edgekd.lowrank.config import LowRankConfig
from edgekd.lowrank.plan import analyse, apply_choices
from edgekd.lowrank.stage import fixed_ranks, plan
from edgekd.models import build_model
from edgekd.models.evaluate import top1_accuracy
from edgekd.models.stats import count_params_macs
from edgekd.prune.config import PruneConfig, SpeedupTarget
from edgekd.prune.latency import export_shipping, measure_models_at, timing_batch
from edgekd.prune.targets import PruneEnv, reach_target
from edgekd.train.augment import AugmentConfig
from edgekd.train.config import TrainConfig
from edgekd.train.objectives import CrossEntropyObjective, Objective
from edgekd.train.trainer import fit

CPU = torch.device("cpu")
QUIET = Console(quiet=True)
MODELS = ("teacher", "lowrank", "pruned")


def _train(model: torch.nn.Module, objective: Objective, data, config: TrainConfig, seed: int) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        fit(model, objective, data, config, Path(workdir), device=CPU, seed=seed, console=QUIET)
    model.eval()


def _counts(model: torch.nn.Module, example: torch.Tensor) -> dict[str, int]:
    params, macs = count_params_macs(model, example)
    return {"params": params, "macs": macs}


def lowrank_student(teacher: torch.nn.Module, example: torch.Tensor, args) -> tuple[torch.nn.Module, float]:
    """The teacher factorized by the lowrank stage's planner; returns (student, energy threshold)."""
    config = LowRankConfig(macs_reduction=args.macs_reduction, round_to=args.round_to, probe=None)
    student = copy.deepcopy(teacher)
    infos = analyse(student, example, config)
    counts = _counts(student, example)
    search = plan(config, infos, fixed_ranks(config, student), counts, counts)
    apply_choices(student, search.choices)
    return student.eval(), search.energy


def pruned_student(teacher: torch.nn.Module, samples: torch.Tensor, factor: float, args) -> tuple[torch.nn.Module, str]:
    """The teacher channel-pruned by the prune stage's search to ``factor`` measured speed-up (1 thread, bs 32)."""
    config = PruneConfig(speedup=SpeedupTarget(factor=max(1.01, factor), threads=1, batch_size=32),
                         importance="l2", round_to=8, probe=None, max_layer_ratio=0.95)
    student = copy.deepcopy(teacher)
    try:
        outcome = reach_target(student, PruneEnv(config=config, samples=samples, teacher=teacher))
    except EdgekdError as exc:  # out of reach on this machine: take the most pruned layout allowed
        print(f"  prune search: {exc.message}; pruning at max_layer_ratio instead")
        config = PruneConfig(ratio=0.95, importance="l2", round_to=8, probe=None, max_layer_ratio=0.95)
        outcome = reach_target(student, PruneEnv(config=config, samples=samples, teacher=teacher))
    return outcome.model.eval(), outcome.reached


def measure(models: dict[str, torch.nn.Module], samples: torch.Tensor, min_time_s: float) -> dict[str, dict]:
    """ONNX Runtime, 1 thread, batch 1 and 32: p50 ms per model and the paired speed-up over the teacher."""
    out: dict[str, dict] = {name: {} for name in models}
    batches = [timing_batch(samples, 1), timing_batch(samples, 32)]
    for batch, timed in zip(batches, measure_models_at(models, batches, threads=1, min_time_s=min_time_s,
                                                       export=export_shipping), strict=True):
        for name, stats in timed.items():
            out[name][f"bs{len(batch)}_ms"] = stats.p50_ms
            out[name][f"bs{len(batch)}_x"] = paired_speedup(timed["teacher"], stats)
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            out[name]["bytes"] = export_shipping(model, samples[:1], Path(tmp) / f"{name}.onnx").stat().st_size
    return out


@dataclass(frozen=True)
class Family:
    """One benchmarked kind of model: its data, its teacher and how both students recover."""

    data: object
    model: str
    teacher_train: dict
    recover_train: dict
    alpha: float

    def teacher(self, data, args) -> torch.nn.Module:
        kwargs = {"hidden": args.hidden} if self.model == "mlp" else {"width": args.width}
        return build_model(self.model, num_classes=data.num_classes, input_shape=data.input_shape, **kwargs)


FAMILIES = {
    "mlp": Family(Mnist1dData(dataset="mnist1d"), "mlp",
                  {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 1e-2, "batch_size": 100},
                  {"optimizer": "adamw", "weight_decay": 0.0, "batch_size": 100}, alpha=0.9),
    # the distill stage's FROM_WEIGHTS defaults (edgekd.distill.config): what a recipe naming only epochs gets
    "resnet": Family(DigitsData(dataset="digits", image_size=16), "resnet20", {"lr": 0.05},
                     {"batch_size": 32, "warmup_epochs": 0.2}, alpha=0.5),
}


def run_seed(seed: int, args) -> dict[str, dict]:
    family = FAMILIES[args.family]
    data = load_data(family.data, seed=seed)
    augment = AugmentConfig(shift=args.augment) if args.augment else None
    samples = data.calibration_batch(64, seed=seed)
    example = samples[:1]
    torch.manual_seed(seed)
    teacher = family.teacher(data, args)
    _train(teacher, CrossEntropyObjective(), data,
           TrainConfig(epochs=args.teacher_epochs, augment=augment, **family.teacher_train), seed)
    low, energy = lowrank_student(teacher, example, args)
    low_speed = measure({"teacher": teacher, "lowrank": low}, samples, args.min_time_s)["lowrank"]["bs32_x"]
    pruned, reached = pruned_student(teacher, samples, low_speed, args)
    print(f"  seed {seed}: low-rank energy {energy:.4f} measured {low_speed:.2f}x at bs32; pruned to {reached}")
    start = {"lowrank": top1_accuracy(low, *data.val_tensors()), "pruned": top1_accuracy(pruned, *data.val_tensors())}
    recover = TrainConfig(epochs=args.epochs, lr=args.lr, augment=augment, keep="last", **family.recover_train)
    for student in (low, pruned):
        _train(student, DistillObjective(teacher, [KDTerm(kind="kd")], temperature=4.0, alpha=family.alpha), data,
               recover, seed)
    models = {"teacher": teacher, "lowrank": low, "pruned": pruned}
    figures = measure(models, samples, args.min_time_s)
    for name, model in models.items():
        figures[name].update(_counts(model, example), test=top1_accuracy(model, *data.test_tensors()),
                             start_val=start.get(name))
    return figures


def _ms(values: list[float], spec: str = ".2f") -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(statistics.mean(values), spec)} ± {format(sd, spec)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="mlp",
                        help="mlp: MNIST-1D MLP 2 x hidden; resnet: digits 16x16 ResNet-20 at --width")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--hidden", type=int, default=256, help="teacher MLP hidden width (2 layers)")
    parser.add_argument("--width", type=int, default=32, help="ResNet-20's first-stage channels (then x2, x4)")
    parser.add_argument("--teacher-epochs", type=int, help="default: 40 (mlp), 15 (resnet)")
    parser.add_argument("--epochs", type=int, help="distillation epochs of each student; default: 30 (mlp), 15 (resnet)")
    parser.add_argument("--lr", type=float, help="students' peak lr from trained weights; default: AdamW 3e-3 (mlp), "
                        "SGD 0.01 (resnet)")
    parser.add_argument("--macs-reduction", type=float, default=3.0, help="low-rank target: teacher/student MACs")
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--augment", type=int, help="random shift (samples/pixels), teacher and students; default: "
                        "3 (mlp), 2 (resnet)")
    parser.add_argument("--min-time-s", type=float, default=1.0, help="timed seconds per model and batch size")
    args = parser.parse_args()
    mlp = args.family == "mlp"
    for key, for_mlp, for_resnet in (("teacher_epochs", 40, 15), ("epochs", 30, 15), ("lr", 3e-3, 0.01),
                                     ("augment", 3, 2)):
        if getattr(args, key) is None:
            setattr(args, key, for_mlp if mlp else for_resnet)
    torch.set_num_threads(1)
    model = f"MNIST-1D MLP 2x{args.hidden}" if mlp else f"digits 16x16 ResNet-20 width {args.width}"
    print(f"# low-rank vs channel pruning at equal measured latency, {model}; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}; ONNX Runtime 1 thread; "
          f"teacher {args.teacher_epochs} epochs, students KD T=4 alpha {FAMILIES[args.family].alpha} {args.epochs} "
          f"epochs {'AdamW' if mlp else 'SGD'} lr {args.lr}; augment shift {args.augment}; "
          f"low-rank macs_reduction {args.macs_reduction}, round_to {args.round_to}")
    started = time.perf_counter()
    runs = [run_seed(seed, args) for seed in args.seeds]
    print(f"\n{len(args.seeds)} seed(s) in {time.perf_counter() - started:.0f} s; mean ± sd over seeds\n")
    print("| model | test top-1 % | params | MACs | ONNX bytes | bs1 ms | bs1 vs teacher | bs32 ms | "
          "bs32 vs teacher | val top-1 before KD |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        rows = [r[name] for r in runs]
        start = [r["start_val"] for r in rows if r["start_val"] is not None]
        print(f"| {name} | {_ms([r['test'] for r in rows])} | {statistics.mean(r['params'] for r in rows):,.0f} | "
              f"{statistics.mean(r['macs'] for r in rows):,.0f} | {statistics.mean(r['bytes'] for r in rows):,.0f} | "
              f"{_ms([r['bs1_ms'] for r in rows], '.4f')} | {_ms([r['bs1_x'] for r in rows])}x | "
              f"{_ms([r['bs32_ms'] for r in rows], '.4f')} | {_ms([r['bs32_x'] for r in rows])}x | "
              f"{_ms(start) if start else '—'} |")
    print("\nper seed (test top-1 / bs32 speed-up): " + "; ".join(
        f"seed {s}: " + ", ".join(f"{n} {r[n]['test']:.2f}/{r[n]['bs32_x']:.2f}x" for n in MODELS)
        for s, r in zip(args.seeds, runs, strict=True)))


if __name__ == "__main__":
    main()
