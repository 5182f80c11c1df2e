"""Distillation benchmark: does KD recover pruned/small students better than fine-tuning?

Every method gets the same epochs, optimizer and schedule, and runs with three seeds (the
seed sets the batch order and, for models built from scratch, the initial weights); tables
show mean ± standard deviation of top-1 on the test split (which no choice saw) of the model
``fit`` keeps (``keep``: the last epoch from trained weights, else the best val epoch), and the best val top-1.
Students pruned from the teacher train with the stages' recovery defaults from trained weights
(``FinetuneConfig``/``DistillConfig``), as a recipe that names only the epochs gets them.

1. digits (scikit-learn's real scans): ResNet-56 teacher; student = the teacher pruned 50% and
   70% of channels (torch-pruning via ``edgekd.prune``, L2 magnitude, per layer); finetune vs kd.
2. MNIST-1D (official split, 4000 train / 1000 test): 1-D CNN teacher, MLP student (the paper's
   shape: 2 hidden layers of 256, Adam lr 1e-2, batch 100); finetune vs kd. Paper: CNN 94%, MLP 68%.
   Then the CNN itself pruned 50% and 70% (a student with room to grow, unlike digits): finetune
   vs kd.
3. Epoch time of kd with and without the teacher-output cache (ResNet-56 → 50% student),
   runs interleaved so machine load affects both alike.
4. ``transfer``: 10% of the training labels kept (stratified by seed). The teacher, trained on the
   whole labeled split, stands for a model trained elsewhere on more data. kd = the distill
   stage's ``transfer`` source (KD over every training input, CE on the labeled tenth); finetune =
   hard labels on the labeled tenth, 10x the epochs so both take the same number of steps. On
   digits and MNIST-1D, for a student pruned 50% from the teacher and one of another architecture
   (an MLP), with the recovery defaults (``DistillConfig``/``FinetuneConfig``).

    python tools/bench_kd.py            # full (about 30-60 min on 2 busy cores)
    python tools/bench_kd.py --quick    # smaller images, fewer epochs (about 10-15 min)
    python tools/bench_kd.py --sections digits --ratios 0.7 --teacher-epochs 40 --epochs 30
    python tools/bench_kd.py --sections mnist1d --augment 3    # shifted signals, teacher and students
    python tools/bench_kd.py --sections transfer --labeled-fraction 0.1

Measured here (full tables in docs/distill.md): a student pruned from its teacher recovers as
much by fine-tuning as by KD, on digits (ResNet-56 -70%, 30 epochs: kd 98.14 ± 0.16 vs finetune
98.24 ± 0.16) and on MNIST-1D, where the 70% CNN stays well below its teacher (86.47 ± 0.47 vs
86.80 ± 0.44), with or without ``--augment``. KD wins clearly for a student of another
architecture: the MNIST-1D MLP, 76.43 vs 71.43 (91.90 vs 85.33 with ``--augment 3``).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console

from edgekd.data import digits_bundle, load_data
from edgekd.data.config import Mnist1dData
from edgekd.distill.config import (
    DAMAGED_LR,
    DAMAGED_SHARE,
    RECOVERY_MAX_BATCH,
    DistillConfig,
    FinetuneConfig,
    KDTerm,
)
from edgekd.distill.objective import DistillObjective
from edgekd.models import build_model
from edgekd.models.evaluate import top1_accuracy
from edgekd.models.stats import count_params_macs
from edgekd.prune.config import PruneConfig
from edgekd.prune.targets import PruneEnv, prune_at_ratio
from edgekd.train.augment import AugmentConfig
from edgekd.train.config import TrainConfig
from edgekd.train.guard import chance, kept_share
from edgekd.train.objectives import CrossEntropyObjective, Objective
from edgekd.train.trainer import FitResult, fit

CPU = torch.device("cpu")
QUIET = Console(quiet=True)
SEEDS = (0, 1, 2)
KD = KDTerm(kind="kd")


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):6.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:4.2f}"


def train(model, objective: Objective, data, config: TrainConfig, seed: int = 0) -> FitResult:
    with tempfile.TemporaryDirectory() as workdir:
        return fit(model, objective, data, config, Path(workdir), device=CPU, seed=seed, console=QUIET)


def compare(methods: dict[str, Callable[[], Objective]], make_student: Callable[[int], torch.nn.Module], data,
            config: TrainConfig, label: str) -> dict[str, tuple[list[float], list[float]]]:
    """Each method × each seed on the same data and config; see ``compare_runs``."""
    return compare_runs({name: (make, data, config) for name, make in methods.items()}, make_student, data, label)


def compare_runs(runs: dict[str, tuple[Callable[[], Objective], object, TrainConfig]],
                 make_student: Callable[[int], torch.nn.Module], scored, label: str,
                 seeds: tuple[int, ...] = SEEDS) -> dict[str, tuple[list[float], list[float]]]:
    """Each method (objective, training data, config) × each seed; prints one row per method and returns
    {method: (test top-1 of the kept model, its best val top-1)}; ``scored`` holds the test split."""
    results = {}
    for name, (make_objective, data, config) in runs.items():
        test, val = [], []
        started = time.perf_counter()
        for seed in seeds:
            student = make_student(seed)
            result = train(student, make_objective(), data, config, seed)
            test.append(top1_accuracy(student, *scored.test_tensors()))
            val.append(result.best_val_accuracy)
        results[name] = (test, val)
        print(f"{label:<24}{name:<12}{mean_std(test):>16}{mean_std(val):>16}"
              f"   {' '.join(f'{b:.1f}' for b in test):<18}{time.perf_counter() - started:7.0f} s", flush=True)
    return results


def verdict(results: dict[str, tuple[list[float], list[float]]], baseline: str = "finetune") -> str:
    """Each method's mean test top-1 against the baseline's, and whether it is within one standard deviation."""
    base = results[baseline][0]
    sd = statistics.stdev(base) if len(base) > 1 else 0.0
    parts = []
    for name, (test, _) in results.items():
        if name == baseline:
            continue
        delta = statistics.mean(test) - statistics.mean(base)
        parts.append(f"{name} {delta:+.2f} pt ({'>=' if delta >= -sd else '<'} finetune - 1 sd {sd:.2f})")
    return ", ".join(parts)


def header() -> None:
    print(f"{'':<24}{'method':<12}{'test top-1':>16}{'best val':>16}   {'test per seed':<18}{'time':>9}")


def digits_section(args) -> dict[float, dict]:
    data = digits_bundle(image_size=args.image_size)
    torch.manual_seed(0)
    teacher = build_model("resnet56", num_classes=data.num_classes, input_shape=data.input_shape)
    started = time.perf_counter()
    train(teacher, CrossEntropyObjective(), data,
          TrainConfig(epochs=args.teacher_epochs, augment=args.augment))
    teacher.eval()
    t_params, t_macs = count_params_macs(teacher, data.example_batch(1))
    t_acc = top1_accuracy(teacher, *data.test_tensors())
    print(f"\n## digits {data.input_shape}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test; "
          f"ResNet-56 teacher "
          f"{t_params:,} params, {t_macs / 1e6:.1f} MMACs, top-1 {t_acc:.2f}% "
          f"({args.teacher_epochs} epochs, {time.perf_counter() - started:.0f} s)")
    print(f"students: {args.epochs} epochs each, the recovery defaults from trained weights (finetune and distill "
          f"as a recipe gets them: {recovery_summary()})")
    return {ratio: prune_and_compare(teacher, data, ratio, args.epochs, args.augment, "digits") for ratio in args.ratios}


def recovery_summary() -> str:
    kd = DistillConfig().concrete(True, data_batch=64)
    return (f"SGD lr {kd.lr:g} ({DAMAGED_LR:g} for a student keeping under {DAMAGED_SHARE:.0%} of the teacher's "
            f"val top-1 above chance) after a {kd.warmup_epochs:g}-epoch warm-up, cosine, batch <= {RECOVERY_MAX_BATCH}, "
            f"the last epoch kept; kd T={kd.temperature:g} alpha={kd.alpha:g}, gradient clipping {kd.grad_clip:g}")


def recovery_runs(teacher, data, epochs: int, augment,
                  share: float | None = None) -> dict[str, tuple[Callable[[], Objective], TrainConfig]]:
    """finetune and kd for a student pruned from ``teacher``, each with its stage's defaults from trained
    weights (``FinetuneConfig``/``DistillConfig(...).concrete(True, batch, share)``): what a recipe that names
    only the epochs gets. ``share``: what the pruned student keeps of the teacher's val top-1 above chance
    (``kept_share``); the stages retrain a damaged student at a higher lr, and so does this."""
    ft = FinetuneConfig(epochs=epochs, augment=augment).concrete(True, data.batch_size, share)
    kd = DistillConfig(epochs=epochs, augment=augment).concrete(True, data.batch_size, share)
    return {"finetune": (lambda: CrossEntropyObjective(), ft),
            "kd": (lambda: DistillObjective.from_config(teacher, kd), kd)}


def prune_and_compare(teacher, data, ratio: float, epochs: int, augment, label: str) -> dict:
    """Prune a copy of ``teacher`` by ``ratio`` (L2, per layer), then finetune and kd (``recovery_runs``, with the
    stages' defaults for where the pruned student starts) from those weights."""
    example = data.example_batch(1)
    t_params, t_macs = count_params_macs(teacher, example)
    pruned = copy.deepcopy(teacher)
    prune_at_ratio(pruned, PruneEnv(config=PruneConfig(ratio=ratio, probe=None),
                                    samples=data.calibration_batch(64), teacher=teacher), ratio)
    params, macs = count_params_macs(pruned, example)
    start = top1_accuracy(pruned, data.val_x, data.val_y)
    share = kept_share(start, top1_accuracy(teacher, data.val_x, data.val_y), chance(data.num_classes))
    runs = recovery_runs(teacher, data, epochs, augment, share)
    print(f"\n### pruned {ratio:.0%}: {params:,} params ({t_params / params:.1f}x fewer), {macs / 1e6:.2f} MMACs "
          f"({t_macs / macs:.1f}x fewer); top-1 right after pruning {start:.1f}% val, keeping {share:.0%} of the "
          f"teacher's above chance: recovery lr {runs['kd'][1].lr:g}")
    header()
    results = compare_runs({name: (make, data, config) for name, (make, config) in runs.items()},
                           lambda _seed: copy.deepcopy(pruned), data, f"{label} {ratio:.0%}")
    print(f"vs finetune (test): {verdict(results)}")
    return results


def mnist1d_section(args) -> dict:
    data = load_data(Mnist1dData(dataset="mnist1d"))
    torch.manual_seed(0)
    teacher = build_model("cnn1d", num_classes=data.num_classes, input_shape=data.input_shape)
    started = time.perf_counter()
    train(teacher, CrossEntropyObjective(), data,
          TrainConfig(epochs=30, optimizer="adamw", lr=3e-3, weight_decay=1e-2, batch_size=100,
                      augment=args.augment))
    teacher.eval()
    t_acc = top1_accuracy(teacher, *data.test_tensors())
    refined = ""
    if args.teacher_recovery:
        # The pruned students get cnn_epochs more epochs of the recovery recipe (SGD, small batches, weight
        # decay) on top of the teacher's 30; a student fine-tuned so ends above a teacher trained only 30.
        # Giving the full-width teacher the same extra training makes it the better-trained model KD assumes.
        recovery = FinetuneConfig(epochs=args.cnn_epochs, augment=args.augment).concrete(True, data.batch_size)
        train(teacher, CrossEntropyObjective(), data, recovery)
        teacher.eval()
        refined = (f", then {args.cnn_epochs} epochs of the recovery recipe (as the students): "
                   f"{top1_accuracy(teacher, *data.test_tensors()):.2f}%")
    print(f"\n## MNIST-1D: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test; CNN teacher "
          f"test top-1 {t_acc:.2f}% after 30 epochs (paper 94%){refined}; {time.perf_counter() - started:.0f} s")
    if args.no_mlp:
        return {"pruned_cnn": pruned_cnn_section(teacher, data, args)}
    # the MNIST-1D paper's MLP recipe: hidden 256, Adam lr 1e-2, batch 100, no weight decay
    config = TrainConfig(epochs=args.mlp_epochs, optimizer="adamw", lr=1e-2, weight_decay=0.0, batch_size=100,
                         augment=args.augment)
    print(f"MLP student (2 x 256 hidden), {args.mlp_epochs} epochs each, Adam lr 1e-2 cosine; kd T=4 alpha=0.9; "
          f"paper MLP 68%")
    header()

    def make_mlp(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model("mlp", num_classes=data.num_classes, input_shape=data.input_shape, hidden=256)

    results = compare({"finetune": lambda: CrossEntropyObjective(),
                       "kd": lambda: DistillObjective(teacher, [KD], temperature=4.0, alpha=0.9)},
                      make_mlp, data, config, "mnist1d mlp")
    print(f"vs finetune (test): {verdict(results)}")

    return {"mlp": results, "pruned_cnn": pruned_cnn_section(teacher, data, args)}


def pruned_cnn_section(teacher, data, args) -> dict:
    """The MNIST-1D CNN pruned by each of ``args.ratios``: finetune vs kd with the recovery defaults."""
    # Unlike digits, the 70% student has room to grow (it recovers to ~87% against the teacher's ~93%),
    # so this is where a KD advantage would show if there were one.
    print(f"\npruned CNN students: {args.cnn_epochs} epochs each, the recovery defaults ({recovery_summary()})")
    return {ratio: prune_and_compare(teacher, data, ratio, args.cnn_epochs, args.augment, "mnist1d cnn")
            for ratio in args.ratios}


def cache_section(args) -> None:
    data = digits_bundle(image_size=args.image_size)
    torch.manual_seed(0)
    teacher = build_model("resnet56", num_classes=data.num_classes, input_shape=data.input_shape).eval()
    student = copy.deepcopy(teacher)
    prune_at_ratio(student, PruneEnv(config=PruneConfig(ratio=0.5, probe=None), samples=data.calibration_batch(64),
                                     teacher=teacher), 0.5)
    config = TrainConfig(epochs=args.cache_epochs)
    times: dict[bool, list[float]] = {True: [], False: []}
    build = []
    for _round in range(args.cache_rounds):
        for cached in (False, True):  # interleaved, so load drifts hit both alike
            objective = DistillObjective(teacher, [KD], cache=cached)
            result = train(copy.deepcopy(student), objective, data, config)
            times[cached] += [row["train_time_s"] for row in result.history]
            if cached:
                build.append(objective.cache_info["build_time_s"])
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"\n## teacher-output cache: kd, ResNet-56 teacher → 50% student, digits {data.input_shape}, "
          f"{len(data.train)} samples, batch 64, {torch.get_num_threads()} thread(s)")
    print(f"epoch time (median of {len(times[False])} epochs each): without cache {off:.2f} s, with cache {on:.2f} s "
          f"→ {off / on:.2f}x faster, {off - on:.2f} s saved per epoch; building the cache once: "
          f"{statistics.median(build):.2f} s")


def transfer_section(args) -> dict:
    """10% of the labels: KD over every training input (the ``transfer`` source) vs fine-tuning on the labeled
    share, for a pruned student and one of another architecture, on digits and MNIST-1D."""
    from edgekd.data import mnist1d_bundle
    from edgekd.data.transfer import keep_labels, label_counts, labeled_only
    from edgekd.distill.config import TransferSource

    fraction = args.labeled_fraction
    source = TransferSource(kind="transfer", labeled_fraction=fraction)
    datasets = {
        "digits": (digits_bundle(image_size=args.image_size), "resnet20", {"width": 16},
                   TrainConfig(epochs=args.teacher_epochs), {}),
        "mnist1d": (mnist1d_bundle(), "cnn1d", {},
                    TrainConfig(epochs=30, optimizer="adamw", lr=3e-3, weight_decay=1e-2, batch_size=100),
                    {"optimizer": "adamw", "batch_size": 100}),
    }
    out = {}
    for name in args.transfer_datasets:
        full, arch, kwargs, teacher_cfg, opt = datasets[name]
        torch.manual_seed(0)
        teacher = build_model(arch, num_classes=full.num_classes, input_shape=full.input_shape, **kwargs)
        started = time.perf_counter()
        train(teacher, CrossEntropyObjective(), full, teacher_cfg)
        teacher.eval()
        print(f"\n## transfer, {name}: teacher {arch} trained on all {len(full.train)} labeled samples, test top-1 "
              f"{top1_accuracy(teacher, *full.test_tensors()):.2f}% ({time.perf_counter() - started:.0f} s)")
        pruned = copy.deepcopy(teacher)
        prune_at_ratio(pruned, PruneEnv(config=PruneConfig(ratio=0.5, probe=None),
                                        samples=full.calibration_batch(64), teacher=teacher), 0.5)

        def mlp(seed: int, data=full) -> torch.nn.Module:
            torch.manual_seed(seed)
            return build_model("mlp", num_classes=data.num_classes, input_shape=data.input_shape, hidden=256)

        students = {"pruned 50%": (lambda _seed, p=pruned: copy.deepcopy(p), True),
                    "mlp": (mlp, False)}
        out[name] = {}
        for student_name, (make, from_weights) in students.items():
            results_by_seed: dict[str, tuple[list[float], list[float]]] = {}
            for seed in SEEDS:  # the labeled tenth is chosen by the seed too
                few = keep_labels(full, fraction, seed)
                kd_cfg = DistillConfig(epochs=args.transfer_epochs, source=source, **opt).concrete(from_weights, full.batch_size)
                ft_cfg = FinetuneConfig(epochs=round(args.transfer_epochs / fraction), **opt).concrete(from_weights,
                                                                                                     full.batch_size)
                if not from_weights and opt.get("optimizer") == "adamw":  # the MNIST-1D paper's MLP recipe
                    kd_cfg = kd_cfg.model_copy(update={"lr": 1e-2, "weight_decay": 0.0})
                    ft_cfg = ft_cfg.model_copy(update={"lr": 1e-2, "weight_decay": 0.0})
                runs = {"finetune": (lambda: CrossEntropyObjective(), labeled_only(few), ft_cfg),
                        "kd": (lambda c=kd_cfg, t=teacher: DistillObjective.from_config(t, c), few, kd_cfg)}
                # one seed at a time: the labeled share follows the seed too
                one = compare_runs(runs, make, full, f"{name} {student_name} s{seed}", seeds=(seed,))
                for method, (test, val) in one.items():
                    acc = results_by_seed.setdefault(method, ([], []))
                    acc[0].extend(test)
                    acc[1].extend(val)
            counts = label_counts(keep_labels(full, fraction, 0))
            print(f"### {name}, {student_name}, {fraction:.0%} labels ({counts['labeled']} labeled, "
                  f"{counts['unlabeled']} inputs only), {len(SEEDS)} seeds")
            header()
            for method, (test, val) in results_by_seed.items():
                print(f"{name:<24}{method:<12}{mean_std(test):>16}{mean_std(val):>16}   "
                      f"{' '.join(f'{b:.1f}' for b in test):<18}")
            print(f"vs finetune (test): {verdict(results_by_seed)}", flush=True)
            out[name][student_name] = results_by_seed
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8x8 digits and fewer epochs")
    parser.add_argument("--sections", nargs="+", default=["digits", "mnist1d", "cache", "transfer"],
                        choices=["digits", "mnist1d", "cache", "transfer"])
    parser.add_argument("--labeled-fraction", type=float, default=0.1, help="transfer: share of labels kept")
    parser.add_argument("--transfer-datasets", nargs="+", default=["digits", "mnist1d"], choices=["digits", "mnist1d"])
    parser.add_argument("--transfer-epochs", type=int, default=None, help="transfer: kd epochs (default 15)")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.7])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--augment", type=int, default=0, metavar="SHIFT",
                        help="random shifts of up to SHIFT pixels/samples for every training run, teacher and "
                             "students alike; KD then sees the same view as its teacher (no cache)")
    parser.add_argument("--teacher-recovery", action="store_true",
                        help="MNIST-1D: train the CNN teacher with the students' recovery recipe too (30 + 30 "
                             "epochs), so it is not outgrown by its own fine-tuned pruned copy")
    parser.add_argument("--no-mlp", action="store_true", help="MNIST-1D: pruned CNN students only")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="digits teacher epochs (default 15)")
    parser.add_argument("--epochs", type=int, default=None, help="digits student epochs per method (default 15)")
    args = parser.parse_args()
    args.image_size = 8 if args.quick else 16
    args.teacher_epochs = args.teacher_epochs or (10 if args.quick else 15)
    args.epochs = args.epochs or (8 if args.quick else 15)
    args.mlp_epochs = 60 if args.quick else 100
    args.cnn_epochs = 15 if args.quick else 30
    args.augment = AugmentConfig(shift=args.augment) if args.augment else None
    args.cache_epochs, args.cache_rounds = (2, 2) if args.quick else (3, 3)
    args.transfer_epochs = args.transfer_epochs or (8 if args.quick else 15)

    torch.set_num_threads(args.threads)
    print(f"# KD benchmark{' (quick)' if args.quick else ''}: {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.threads} thread(s), seeds {list(SEEDS)}, "
          f"augment {args.augment}; the machine is shared, "
          f"so times are indicative")
    sections = {"digits": digits_section, "mnist1d": mnist1d_section, "cache": cache_section,
                "transfer": transfer_section}
    for name in args.sections:
        sections[name](args)


if __name__ == "__main__":
    main()
