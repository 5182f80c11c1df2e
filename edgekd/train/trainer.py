"""The one training loop: teacher training, ``finetune``, ``distill`` and QAT all run through ``fit``.

Read top to bottom: set up (schedule, optimizer, resume) → per epoch: train, validate,
checkpoint, early-stop → restore the best weights. Each epoch's checkpoint (``last.pt``)
holds everything needed to continue exactly (model, objective helpers, optimizer, scheduler,
loss scaler, RNG states, history), stored as plain tensors and containers so it loads with
``torch.load(weights_only=True)``. ``best.pt`` holds the best model weights.

Batches: each epoch draws one permutation of the training split from a generator seeded
with ``(seed, epoch)``, so a resumed run sees the same batches as an uninterrupted one and
needs no data-loader state. Under torchrun every global batch is split across the ranks, so
N processes see exactly the batches one process would.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from edgekd.data.bundle import DataBundle
from edgekd.errors import StageError, TrainingDivergedError
from edgekd.fileio import atomic_torch_save, atomic_write_text
from edgekd.train import distributed as dist_utils
from edgekd.train.augment import augment_batch, augment_generator
from edgekd.train.config import TrainConfig
from edgekd.train.guard import (
    Diverged,
    Snapshot,
    at_chance,
    epoch_problem,
    learned,
    roll_back,
    step_problem,
    take_snapshot,
)
from edgekd.train.objectives import Batch, Objective
from edgekd.train.schedule import build_optimizer, build_scheduler

#: used when neither the TrainConfig nor the data says (the recipe's data section defaults to 64 too)
DEFAULT_BATCH_SIZE = 64
LAST = "last.pt"
BEST = "best.pt"
METRICS = "metrics.csv"
#: the model, schedule and RNG before the first epoch: where the guard restarts a run whose good epoch is spoiled
START = "start.pt"


@dataclass
class FitResult:
    """What a training run ended with. ``best_val_accuracy`` and ``best_epoch`` describe the epoch the run
    kept (``TrainConfig.keep``: best val top-1, best val loss, or the last), whose weights the model holds."""

    best_val_accuracy: float
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]]
    checkpoint: Path
    stopped_early: bool = False
    resumed_from_epoch: int | None = None
    #: val top-1 of the model before its first epoch (None when the run was resumed from an older checkpoint)
    start_val_accuracy: float | None = None
    #: what the divergence guard did: rollbacks and BatchNorm recalibrations, in order
    guard_events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rollbacks(self) -> int:
        return sum(e["action"] == "rollback" for e in self.guard_events)

    @property
    def mean_train_time_s(self) -> float:
        times = [row["train_time_s"] for row in self.history]
        return sum(times) / len(times) if times else 0.0


@dataclass
class _State:
    """What changes during training and goes into every checkpoint."""

    epoch: int = 0  # epochs finished
    best_acc: float = -1.0  # val top-1 of the kept epoch
    best_epoch: int = 0  # the kept epoch
    best_score: float = -math.inf  # the kept epoch's score under TrainConfig.keep (higher is better)
    since_best: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    start_val_accuracy: float | None = None
    reference_loss: float | None = None  # the run's first step loss: the scale 'exploding' is judged on
    guard_events: list[dict[str, Any]] = field(default_factory=list)
    steps_at_rollback: int = 0  # the schedule's step count when the last rollback restored it


# -- RNG state as plain tensors (weights_only checkpoints cannot hold numpy arrays or tuples) --------

def _rng_state() -> dict[str, Any]:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- batches ---------------------------------------------------------------------------------------

def global_batches(n: int, batch_size: int, world: int = 1) -> list[tuple[int, int]]:
    """(start, end) of each global batch of an epoch's permutation of ``n`` samples.

    A last batch that would give some rank a single sample (fewer than 2 x world samples) is merged
    into the batch before it: BatchNorm in train mode cannot normalise one sample ("Expected more than
    1 value per channel when training" after global pooling, as in Hugging Face EfficientNet,
    MobileNetV1 or LeViT when the train split is 1 more than a multiple of the batch size), and a
    one-sample step is mostly noise. Every sample is still seen once per epoch. A split too small for
    even one batch of ``world`` samples gives none."""
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < 2 * world:
        bounds[-2:] = [(bounds[-2][0], n)]
    return [(a, b) for a, b in bounds if b - a >= world]


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int) -> list[torch.Tensor]:
    """This rank's index batches for one epoch: one global permutation, cut into global batches
    (``global_batches``), each split round-robin over the ranks."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=generator)
    world, rank = dist_utils.world_size(), dist_utils.rank()
    return [perm[a:b][rank::world] for a, b in global_batches(n, batch_size, world)]


# -- precision -------------------------------------------------------------------------------------

def _autocast(device: torch.device, enabled: bool):
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _needs_scaler(device: torch.device, enabled: bool) -> bool:
    # bf16 keeps fp32's exponent range; only fp16 needs loss scaling
    return device.type == "cuda" and enabled and not torch.cuda.is_bf16_supported()


# -- evaluation ------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, device: torch.device,
             batch_size: int = 256, mixed_precision: bool = False) -> tuple[float, float]:
    """(top-1 accuracy in percent, mean cross-entropy) of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(device, non_blocking=True).contiguous()
            yb = y[start:start + batch_size].to(device, non_blocking=True)
            with _autocast(device, mixed_precision):
                logits = model(xb).float()
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
            correct += int((logits.argmax(1) == yb).sum().item())
    finally:
        model.train(was_training)
    return 100.0 * correct / max(len(x), 1), loss_sum / max(len(x), 1)


# -- files -----------------------------------------------------------------------------------------

def write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    columns: list[str] = []
    for row in history:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


class _TensorBoard:
    """Scalars to ``workdir/tensorboard`` when the ``tensorboard`` package is installed; else nothing."""

    def __init__(self, logdir: Path, enabled: bool) -> None:
        self.writer = None
        if not enabled:
            return
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(logdir))

    def log(self, row: dict[str, float]) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "epoch":
                self.writer.add_scalar(key, value, int(row["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                    console=console, transient=True, disable=not (enabled and console.is_terminal))


# -- the loop --------------------------------------------------------------------------------------

def fit(
    model: nn.Module,
    objective: Objective,
    data: DataBundle,
    config: TrainConfig,
    workdir: Path,
    *,
    device: torch.device,
    resume: bool = False,
    label: str = "train",
    seed: int = 0,
    console: Console | None = None,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
    from_weights: bool | None = None,
) -> FitResult:
    """Train ``model`` in place with ``objective`` on ``data.train``; validate on ``data.val``.

    At the end ``model`` holds the weights of the epoch with the best validation accuracy (it
    stays on ``device``). ``resume=True`` continues from ``workdir/last.pt`` when it exists.
    ``on_epoch_end`` gets each epoch's metrics row after its checkpoint is written.
    ``from_weights`` says whether ``model`` starts from trained weights (a pruned or copied student),
    which picks the defaults a config leaves open (``TrainConfig.concrete``: a fine-tuning lr and a
    short warm-up); None decides by the starting val accuracy (above chance: trained weights).
    The divergence guard (``config.guard``, ``edgekd.train.guard``) rolls back diverging epochs and
    records each rollback in ``FitResult.guard_events``; ``TrainingDivergedError`` when it gives up.
    """
    workdir = Path(workdir)
    main = dist_utils.is_main_process()
    console = console or Console(stderr=True)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)  # 4-D weights only; inputs follow the weights' format
    torch.manual_seed(seed)
    start_acc = evaluate(model, data.val_x, data.val_y, device=device)[0]
    if from_weights is None:
        from_weights = not at_chance(start_acc, data.num_classes, config.guard.chance_margin)
    config = config.concrete(from_weights, getattr(data, "batch_size", None))

    batch_size = config.batch_size or getattr(data, "batch_size", None) or DEFAULT_BATCH_SIZE
    world = dist_utils.world_size()
    local_batch = max(batch_size // world, 1)
    batch_size = local_batch * world  # the global batch the ranks share
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    steps_per_epoch = len(epoch_batches(len(train_x), batch_size, 0, seed))
    if steps_per_epoch == 0:
        raise StageError(f"{label}: the training split ({len(train_x)} samples) is too small for {world} processes")

    if config.active_augment is not None:
        objective.inputs_vary()  # before setup: a KD objective must not cache teacher outputs
    objective.setup(model, data, device)
    try:
        extra = objective.extra_modules()
        if extra is not None:
            extra.to(device)
        extra_params = list(extra.parameters()) if extra is not None else []
        optimizer = build_optimizer(config, [*model.parameters(), *extra_params])
        scheduler = build_scheduler(config, optimizer, steps_per_epoch)
        scaler = torch.amp.GradScaler("cuda", enabled=_needs_scaler(device, config.mixed_precision))

        state = _State()
        resumed_from = None
        best_weights = _cpu_state(model)
        if resume and (workdir / LAST).is_file():
            state, best_weights = _load_checkpoint(workdir, model, extra, optimizer, scheduler, scaler, label)
            resumed_from = state.epoch
            if main:
                console.print(f"  {label}: resuming after epoch {state.epoch}/{config.epochs}")
        else:
            # a fresh start: forget files of an earlier, abandoned run in this directory
            if main:
                for name in (LAST, BEST, METRICS, START):
                    (workdir / name).unlink(missing_ok=True)
        if main:
            workdir.mkdir(parents=True, exist_ok=True)

        precise_bn = config.precise_bn if config.precise_bn is not None else bool(stale_batchnorms(model))
        train_model = dist_utils.wrap_ddp(model, device)
        tensorboard = _TensorBoard(workdir / "tensorboard", enabled=main)
        if state.epoch == 0 and state.start_val_accuracy is None:
            state.start_val_accuracy = start_acc
        # the last good epoch, for the divergence guard (what last.pt holds, kept in memory)
        good = take_snapshot(model, extra, scheduler, scaler, _rng_state())
        start = _start_snapshot(workdir, good, state, main) if config.guard.enabled else None
        try:
            with _progress(console, enabled=main) as progress:
                while state.epoch < config.epochs and not state.stopped_early:
                    epoch = state.epoch + 1
                    objective.before_epoch(epoch, state.history)
                    try:
                        row = _train_one_epoch(
                            train_model, objective, extra_params, optimizer, scheduler, scaler, config,
                            train_x, train_y, batch_size, epoch, seed, device, label, progress, workdir, state,
                            data.num_classes)
                        if precise_bn:
                            row["precise_bn_batches"] = _recalibrate(model, data, config.guard.bn_recalibration_batches,
                                                                     batch_size, seed, epoch, device)
                        val_acc, val_loss = evaluate(model, data.val_x, data.val_y, device=device,
                                                     mixed_precision=config.mixed_precision)
                        if config.guard.enabled:
                            steps = scheduler.last_epoch - state.steps_at_rollback
                            val_acc, val_loss = _check_epoch(model, data, config, row, val_acc, val_loss, state,
                                                             batch_size, seed, device, label, epoch, console, main,
                                                             steps, from_weights)
                    except Diverged as why:
                        if _roll_back(why, good, start, model, extra, optimizer, scheduler, scaler, config, state,
                                      epoch, label, console, main, workdir):
                            good, best_weights = start, dict(start.model)  # a restart: earlier epochs are void
                        continue
                    row.update(val_accuracy=val_acc, val_loss=val_loss)
                    state.epoch = epoch
                    state.history.append(row)
                    score = _keep_score(config.keep, val_acc, val_loss, epoch)
                    if score > state.best_score:
                        state.best_acc, state.best_epoch, state.since_best = val_acc, epoch, 0
                        state.best_score = score
                        best_weights = _cpu_state(model)
                        if main:
                            atomic_torch_save({"model": best_weights, "epoch": epoch, "val_accuracy": val_acc},
                                              workdir / BEST)
                    else:
                        state.since_best += 1
                    patience = config.early_stopping_patience
                    state.stopped_early = patience is not None and state.since_best >= patience
                    rng = _rng_state()
                    if main:
                        _save_checkpoint(workdir, model, extra, optimizer, scheduler, scaler, state, config, rng)
                        write_metrics_csv(workdir / METRICS, state.history)
                        tensorboard.log(row)
                        console.print(
                            f"  {label} epoch {epoch}/{config.epochs}  loss {row['train_loss']:.4f}  "
                            f"val {val_acc:.2f}% (kept {state.best_acc:.2f}% @ {state.best_epoch})  "
                            f"{row['train_time_s']:.1f}s", highlight=False)
                    good = take_snapshot(model, extra, scheduler, scaler, rng)
                    if on_epoch_end is not None:
                        on_epoch_end(row)
            if state.stopped_early and main:
                console.print(f"  {label}: early stop after epoch {state.epoch}: no better val accuracy "
                              f"for {config.early_stopping_patience} epochs")
        finally:
            tensorboard.close()
    finally:
        objective.teardown()

    model.load_state_dict(best_weights)
    if config.channels_last:
        model.to(memory_format=torch.contiguous_format)  # export and pruning see the usual layout
    return FitResult(best_val_accuracy=state.best_acc, best_epoch=state.best_epoch, epochs_run=state.epoch,
                     history=state.history, checkpoint=workdir / BEST, stopped_early=state.stopped_early,
                     resumed_from_epoch=resumed_from, start_val_accuracy=state.start_val_accuracy,
                     guard_events=list(state.guard_events))


#: a BatchNorm whose momentum is at least this keeps (mostly) the last training batch's statistics
FAST_BN_MOMENTUM = 0.5
#: at or below this momentum (or None: a cumulative average) a BatchNorm's running statistics lag its weights
SLOW_BN_MOMENTUM = 0.02


def stale_batchnorms(model: nn.Module) -> list[str]:
    """Names of the BatchNorm layers whose running statistics will not describe the weights at the end of
    a short training run, so that evaluation reads them wrong:

    - momentum >= ``FAST_BN_MOMENTUM``: the statistics are mostly the last batch's. TensorFlow's
      moving-average decay (0.997, 0.9997) given as PyTorch's momentum, which weighs the new batch, as
      Hugging Face MobileNetV1/V2 do: a Hugging Face MobileNetV2 trained 6 epochs on digits read 78% val
      top-1, 88% with its statistics re-estimated from 16 batches;
    - momentum <= ``SLOW_BN_MOMENTUM`` or None (a cumulative average since the last reset): the
      statistics trail the weights by hundreds of steps. torchvision's MobileNetV3 and EfficientNet use
      0.01, tuned for ImageNet's hundreds of thousands of steps: a torchvision-style MobileNetV3 trained
      6 epochs (114 steps) on digits 16x16 read 11.2% val with its running statistics, 97.4% with them
      re-estimated from 16 batches.
    """
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and (m.momentum is None or m.momentum >= FAST_BN_MOMENTUM or m.momentum <= SLOW_BN_MOMENTUM)]


def _recalibrate(model: nn.Module, data: DataBundle, max_batches: int, batch_size: int, seed: int, epoch: int,
                 device: torch.device) -> int:
    """Re-estimate every BatchNorm's running statistics from up to ``max_batches`` training batches (drawn
    by seed and epoch, so a resumed run gets the same). Returns the batches used (0: no BatchNorm)."""
    from edgekd.models.batchnorm import recalibrate_batchnorm

    # drop_last: a last batch of one sample cannot be normalised in train mode (see ``global_batches``)
    loader = data.train_loader(batch_size, seed=seed * 100_003 + epoch, drop_last=len(data.train) > batch_size)
    return recalibrate_batchnorm(model, ((x.to(device), y) for x, y in loader), max_batches)


def _check_epoch(model, data, config, row, val_acc, val_loss, state, batch_size, seed, device, label, epoch,
                 console, main, steps: int, from_weights: bool = False) -> tuple[float, float]:
    """The guard's end-of-epoch checks. Raises ``Diverged`` for a rollback; re-estimates BatchNorm
    statistics when train accuracy is high but val at chance, and stops with ``TrainingDivergedError``
    when even that leaves val at chance. Returns the (possibly re-measured) val accuracy and loss."""
    guard, classes = config.guard, data.num_classes
    problem = epoch_problem(row["train_accuracy"], val_acc, state.start_val_accuracy, classes, guard,
                            train_loss=row["train_loss"], reference_loss=state.reference_loss,
                            steps=steps, val_samples=len(data.val_y), from_weights=from_weights)
    if problem is not None:
        raise Diverged(problem, train_accuracy=row["train_accuracy"], val_accuracy=val_acc)
    if not (learned(row["train_accuracy"], classes) and at_chance(val_acc, classes, guard.chance_margin)):
        return val_acc, val_loss
    # train-mode outputs are right and eval-mode ones are not: the running statistics are off
    # (BatchNorm momentum 0.01 lags far behind the weights early in training)
    used = _recalibrate(model, data, guard.bn_recalibration_batches, batch_size, seed, epoch, device)
    new_acc, new_loss = evaluate(model, data.val_x, data.val_y, device=device, mixed_precision=config.mixed_precision)
    event = {"epoch": epoch, "action": "bn_recalibration", "batches": used, "train_accuracy": row["train_accuracy"],
             "val_before": round(val_acc, 3), "val_after": round(new_acc, 3)}
    state.guard_events.append(event)
    if used and not at_chance(new_acc, classes, guard.chance_margin):
        if main:
            console.print(f"  {label} epoch {epoch}: val {val_acc:.2f}% at chance with train accuracy "
                          f"{row['train_accuracy']:.2f}%; BatchNorm statistics re-estimated from {used} training "
                          f"batches: val {new_acc:.2f}%", highlight=False)
        return new_acc, new_loss
    what = (f"re-estimating BatchNorm statistics from {used} training batches left it at {new_acc:.2f}%" if used
            else "the model has no BatchNorm statistics to re-estimate")
    raise TrainingDivergedError(
        f"{label}: epoch {epoch} reached train accuracy {row['train_accuracy']:.2f}% but val accuracy "
        f"{val_acc:.2f}%, chance for {classes} classes; {what}. The model does not work in eval mode, "
        f"so it is not handed on",
        hint="check layers that behave differently in eval mode (BatchNorm momentum, dropout), the data split "
             "(are train and val the same task?) and the normalisation; a lower lr or more epochs may help")


def _start_snapshot(workdir: Path, good: Snapshot, state: _State, main: bool) -> Snapshot | None:
    """The run's state before its first epoch: ``good`` itself on a fresh start (written to ``start.pt`` so a
    resumed run can restart the same way), else read back from ``start.pt`` (None when it is missing: a run
    written before this file existed cannot restart, only roll back)."""
    path = workdir / START
    if state.epoch == 0:
        if main:
            atomic_torch_save({"model": good.model, "extra": good.extra, "scheduler": good.scheduler,
                               "scaler": good.scaler, "rng": good.rng}, path)
        return good
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return Snapshot(model=saved["model"], extra=saved["extra"], scheduler=saved["scheduler"], scaler=saved["scaler"],
                    rng=saved["rng"])


def _roll_back(why: Diverged, good: Snapshot, start: Snapshot | None, model, extra, optimizer, scheduler, scaler,
               config, state: _State, epoch: int, label: str, console, main: bool, workdir: Path) -> bool:
    """Undo the diverged epoch (see ``edgekd.train.guard``), or raise ``TrainingDivergedError`` when the
    guard is off or out of rollbacks. Returns True when the run restarted from ``start``.

    When the previous rollback already returned to this same good epoch and training from it diverged
    again at a lower lr, that epoch is spoiled, not the lr alone (a Hugging Face MobileNetV2 whose first
    epoch warmed up to lr 0.05 rose above its first loss from there at every lr down to 0.00135): the run
    restarts from the model it began with (``start``), at the lowered lr, its epochs, history and best
    weights discarded. The restart is a rollback too (it counts against ``max_rollbacks``)."""
    guard = config.guard
    done = [e for e in state.guard_events if e["action"] == "rollback"]
    if not guard.enabled or len(done) >= guard.max_rollbacks:
        restarts = [e for e in done if e.get("restart")]
        if state.epoch:
            kept = f"the last good checkpoint ({workdir / LAST}, epoch {state.epoch}) is kept"
        elif restarts and (workdir / LAST).is_file():  # last.pt is still the attempt before the restart
            kept = (f"the last good checkpoint ({workdir / LAST}, epoch {restarts[-1]['from_epoch']}) is kept "
                    f"(from before the restart)")
        else:
            kept = "no epoch finished, so there is no checkpoint yet"
        tried = (f" after {len(done)} rollback(s) with the lr lowered to x{guard.lr_factor ** len(done):.3g} "
                 f"({'; '.join(e['reason'] for e in done)})" if done else "")
        raise TrainingDivergedError(
            f"{label}: {why.reason} at epoch {epoch}{why.facts.get('where', '')}{tried}; {kept}",
            hint="lower lr, set grad_clip (e.g. 1.0) or more warmup_epochs, and check the data for NaN/inf; "
                 "--resume then continues from the last good checkpoint")
    restart = start is not None and state.epoch > 0 and bool(done) and done[-1]["to_epoch"] == state.epoch
    target, from_epoch = (start if restart else good), state.epoch
    lrs = roll_back(target, model, extra, optimizer, scheduler, scaler, guard.lr_factor)
    _set_rng_state(target.rng)
    if restart:
        state.epoch, state.best_acc, state.best_epoch, state.since_best = 0, -1.0, 0, 0
        state.best_score = -math.inf
        state.history = []
    state.steps_at_rollback = scheduler.last_epoch
    event = {"epoch": epoch, "action": "rollback", "reason": f"{why.reason} at epoch {epoch}"
             f"{why.facts.get('where', '')}", "to_epoch": state.epoch, "lr_factor": guard.lr_factor,
             "peak_lr": lrs[0]}
    if restart:
        event.update(restart=True, from_epoch=from_epoch)
    state.guard_events.append(event)
    if main:
        where = ("restarted from the start (the epoch it rolled back to before diverged again)" if restart
                 else f"rolled back to epoch {state.epoch}")
        console.print(f"  [yellow]{label}: {event['reason']}: {where}, peak lr now {lrs[0]:.3g}[/]",
                      highlight=False)
    return restart


def _train_one_epoch(model, objective, extra_params, optimizer, scheduler, scaler, config, train_x, train_y,
                     batch_size, epoch, seed, device, label, progress, workdir, state,
                     num_classes: int) -> dict[str, float]:
    model.train()
    batches = epoch_batches(len(train_x), batch_size, epoch, seed)
    task = progress.add_task(f"{label} {epoch}/{config.epochs}", total=len(batches), info="")
    lr_at_start = optimizer.param_groups[0]["lr"]
    started = time.perf_counter()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    augment = config.active_augment
    generator = augment_generator(seed, epoch, dist_utils.rank(), device) if augment is not None else None
    try:
        return _epoch_steps(model, objective, extra_params, optimizer, scheduler, scaler, config, train_x,
                            train_y, batches, epoch, seed, device, label, progress, workdir, state, num_classes,
                            task, augment, generator, params, lr_at_start, started, batch_size)
    finally:
        progress.remove_task(task)


def _epoch_steps(model, objective, extra_params, optimizer, scheduler, scaler, config, train_x, train_y, batches,
                 epoch, seed, device, label, progress, workdir, state, num_classes, task, augment, generator,
                 params, lr_at_start, started, batch_size) -> dict[str, float]:
    sums: dict[str, torch.Tensor] = {}
    seen = correct = labeled = 0
    global_sizes = [b - a for a, b in global_batches(len(train_x), batch_size, dist_utils.world_size())]
    for step, index in enumerate(batches, start=1):
        # contiguous inputs: torch 2.13 CPU crashed in backward() on strided batches of pruned nets
        x = train_x[index].contiguous()
        if augment is not None:
            x = augment_batch(x, augment, generator)
        batch = Batch(x=x, y=train_y[index], index=index)
        with _autocast(device, config.mixed_precision):
            out = objective.compute(model, batch)
        loss = out.total.float()
        _check_step(loss, label, epoch, step, optimizer, config, state, num_classes)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss * _rank_weight(len(index), global_sizes[step - 1])).backward()
        dist_utils.average_gradients(extra_params)
        if config.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        n = len(index)
        seen += n
        # train accuracy over the labeled samples (label -1: an input the teacher labels, no label of its own)
        known = batch.y >= 0
        labeled += int(known.sum().item())
        correct += int((out.logits.detach().argmax(1) == batch.y)[known].sum().item())
        for key, value in {"loss": loss.detach(), **out.parts}.items():
            sums[key] = sums.get(key, 0.0) + value.detach().float() * n
        progress.update(task, advance=1, info=f"loss {loss.item():.4f}")
    train_time = time.perf_counter() - started
    # metrics averaged over every rank's samples
    totals = dist_utils.all_reduce_sum(torch.stack([*sums.values(), torch.tensor(float(seen), device=device),
                                                    torch.tensor(float(labeled), device=device),
                                                    torch.tensor(float(correct), device=device)]).float())
    seen_all, labeled_all = totals[-3].item(), totals[-2].item()
    row: dict[str, float] = {"epoch": epoch, "lr": lr_at_start}
    for key, total in zip(sums, totals[:-3].tolist(), strict=True):
        row["train_loss" if key == "loss" else f"train_{key}"] = total / seen_all
    row["train_accuracy"] = 100.0 * totals[-1].item() / labeled_all if labeled_all else math.nan
    row["train_time_s"] = train_time
    return row


def _rank_weight(local: int, global_n: int) -> float:
    """DDP averages gradients over ranks equally; when a global batch of ``global_n`` samples splits
    unevenly (the last one), weight this rank's mean loss by its share so the average is the global
    batch's mean gradient."""
    world = dist_utils.world_size()
    if world == 1:
        return 1.0
    return local * world / global_n


def _check_step(loss: torch.Tensor, label: str, epoch: int, step: int, optimizer, config: TrainConfig,
                state: _State, num_classes: int) -> None:
    """Raise ``Diverged`` when this step's loss is not finite or exploding (see ``edgekd.train.guard``)."""
    # under torchrun every rank must decide together, or the others would wait forever in all-reduce
    value = (dist_utils.all_reduce_sum(loss.detach().reshape(1)) / dist_utils.world_size()).item()
    if state.reference_loss is None and math.isfinite(value):
        state.reference_loss = value
    reference = state.reference_loss if config.guard.enabled else None
    problem = step_problem(value, reference, num_classes, config.guard)
    if problem is not None:
        raise Diverged(problem, where=f", step {step} (lr {optimizer.param_groups[0]['lr']:.3g})")


def _keep_score(keep: str | None, val_acc: float, val_loss: float, epoch: int) -> float:
    """How good an epoch is under ``TrainConfig.keep`` (higher is better; ties keep the earlier epoch)."""
    if keep == "last":
        return float(epoch)
    if keep == "best_val_loss":
        return -val_loss if math.isfinite(val_loss) else -math.inf
    return val_acc


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _save_checkpoint(workdir, model, extra, optimizer, scheduler, scaler, state: _State, config, rng) -> None:
    atomic_torch_save({
        "format": "edgekd-train-checkpoint/1",
        "model": model.state_dict(),
        "extra": extra.state_dict() if extra is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng,
        "epoch": state.epoch,
        "best_acc": state.best_acc,
        "best_epoch": state.best_epoch,
        "best_score": state.best_score,
        "since_best": state.since_best,
        "stopped_early": state.stopped_early,
        "history": state.history,
        "start_val_accuracy": state.start_val_accuracy,
        "reference_loss": state.reference_loss,
        "guard_events": state.guard_events,
        "steps_at_rollback": state.steps_at_rollback,
        "config": config.model_dump(mode="json"),
    }, workdir / LAST)


def _load_checkpoint(workdir, model, extra, optimizer, scheduler, scaler, label):
    ckpt = torch.load(workdir / LAST, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(ckpt["model"])
        if extra is not None and ckpt["extra"] is not None:
            extra.load_state_dict(ckpt["extra"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise StageError(f"{label}: the checkpoint {workdir / LAST} does not fit this model: {exc}",
                         hint="it was written by a different recipe; start a new run instead of --resume") from exc
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    _set_rng_state(ckpt["rng"])
    state = _State(epoch=ckpt["epoch"], best_acc=ckpt["best_acc"], best_epoch=ckpt["best_epoch"],
                   best_score=float(ckpt.get("best_score", ckpt["best_acc"])),
                   since_best=ckpt["since_best"], stopped_early=ckpt["stopped_early"], history=list(ckpt["history"]),
                   start_val_accuracy=ckpt.get("start_val_accuracy"), reference_loss=ckpt.get("reference_loss"),
                   guard_events=list(ckpt.get("guard_events", [])),
                   steps_at_rollback=int(ckpt.get("steps_at_rollback", 0)))
    best_path = workdir / BEST
    if best_path.is_file():
        best_weights = torch.load(best_path, map_location="cpu", weights_only=True)["model"]
    else:
        best_weights = _cpu_state(model)
    return state, best_weights

