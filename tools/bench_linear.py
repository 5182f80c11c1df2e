"""A linear student (softmax regression) distilled from an MLP teacher vs the same model on labels alone.

The classic distillation example (issue 17): on MNIST-1D (official 4000/1000 split, val held out of
train) and on scikit-learn's digits (8x8, flattened), an MLP teacher (2 x 256 hidden) is trained
once per seed; then the built-in ``linear`` student (one ``nn.Linear`` over the flattened input) is
trained twice from the same initial weights, with the same optimizer, schedule and epochs: on the
hard labels (``finetune``) and by Hinton KD from the teacher (``kd``, T and alpha below). Top-1 on
the test split (no choice reads it) of the epoch ``fit`` keeps (best val top-1), 3 seeds; the seed
sets the split (digits), the initial weights and the batch order.

    python tools/bench_linear.py                      # both datasets, 3 seeds (about 2-4 min here)
    python tools/bench_linear.py --datasets mnist1d --epochs 60 --augment 3
    python tools/bench_linear.py --labeled-fraction 0.1   # the teacher labels what the student has no label for

With ``--labeled-fraction F`` (issue 14's transfer regime) the teacher still trains on every label (it stands
for a model trained elsewhere on more data); ``finetune`` trains on the labeled share only, for epochs / F
epochs (the same optimizer steps), and ``kd`` trains over every training input (the ``transfer`` source: soft
targets for all, the hard-label term on the labeled share).

The MNIST-1D paper reports 32% for logistic regression and 68% for its MLP.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from edgekd.data import digits_bundle, load_data
from edgekd.data.config import Mnist1dData
from edgekd.data.transfer import keep_labels, label_counts, labeled_only
from edgekd.distill.config import KDTerm
from edgekd.distill.objective import DistillObjective
from edgekd.models import build_model
from edgekd.models.evaluate import top1_accuracy
from edgekd.models.stats import count_params_macs
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


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):6.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:4.2f}"


def run_dataset(name: str, args) -> dict[str, list[float]]:
    """Per seed: teacher MLP, then linear by finetune and by kd; returns test top-1 lists per model."""
    augment = AugmentConfig(shift=args.augment) if args.augment else None
    results: dict[str, list[float]] = {"teacher mlp": [], "linear finetune": [], "linear kd": []}
    started = time.perf_counter()
    for seed in args.seeds:
        data = load_data(Mnist1dData(dataset="mnist1d"), seed=seed) if name == "mnist1d" else \
            digits_bundle(image_size=8, seed=seed)
        torch.manual_seed(seed)
        teacher = build_model("mlp", num_classes=data.num_classes, input_shape=data.input_shape, hidden=256)
        _train(teacher, CrossEntropyObjective(), data,
               TrainConfig(epochs=args.teacher_epochs, optimizer="adamw", lr=3e-3, weight_decay=1e-2,
                           batch_size=100, augment=augment), seed)
        results["teacher mlp"].append(top1_accuracy(teacher, *data.test_tensors()))
        config = TrainConfig(epochs=args.epochs, optimizer="adamw", lr=args.lr, weight_decay=0.0, batch_size=100,
                             augment=augment)
        few = keep_labels(data, args.labeled_fraction, seed)
        # finetune sees only the labeled share, for as many optimizer steps as kd takes over every input
        ft_config = config.model_copy(update={"epochs": round(args.epochs / args.labeled_fraction)})
        runs = {"linear finetune": (lambda: CrossEntropyObjective(), labeled_only(few), ft_config),
                "linear kd": (lambda teacher=teacher: DistillObjective(teacher, [KDTerm(kind="kd")],
                                                               temperature=args.temperature, alpha=args.alpha),
                              few, config)}
        for label, (make, train_data, train_config) in runs.items():
            torch.manual_seed(seed)  # same initial weights for both methods
            student = build_model("linear", num_classes=data.num_classes, input_shape=data.input_shape)
            _train(student, make(), train_data, train_config, seed)
            results[label].append(top1_accuracy(student, *data.test_tensors()))
    example = data.example_batch(1)
    t_params, _ = count_params_macs(teacher, example)
    s_params, _ = count_params_macs(student, example)
    counts = label_counts(few)
    print(f"\n## {name} {tuple(data.input_shape)}: {len(data.train)} train ({counts['labeled']} labeled) / "
          f"{len(data.val)} val / "
          f"{len(data.test)} test; teacher MLP 2x256 {t_params:,} params, linear {s_params:,} params; "
          f"{time.perf_counter() - started:.0f} s")
    print(f"{'model':<18}{'test top-1':>16}   per seed")
    for label, values in results.items():
        print(f"{label:<18}{_mean_std(values):>16}   {' '.join(f'{v:.2f}' for v in values)}")
    gain = [k - f for k, f in zip(results["linear kd"], results["linear finetune"], strict=True)]
    print(f"kd - finetune per seed: {' '.join(f'{g:+.2f}' for g in gain)} (mean {statistics.mean(gain):+.2f})")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["mnist1d", "digits"], choices=["mnist1d", "digits"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--teacher-epochs", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=40, help="linear student epochs (both methods)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--augment", type=int, default=0, help="random shift (samples) for teacher and students")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--labeled-fraction", type=float, default=1.0,
                        help="share of the training split whose labels the students see (the teacher sees all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# linear student: kd vs finetune; {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, {args.threads} thread(s); epochs teacher {args.teacher_epochs}, student "
          f"{args.epochs}, AdamW lr {args.lr} cosine, batch 100; kd T={args.temperature} alpha={args.alpha}; "
          f"augment shift {args.augment}; students see {args.labeled_fraction:.0%} of the training labels")
    for name in args.datasets:
        run_dataset(name, args)


if __name__ == "__main__":
    main()
