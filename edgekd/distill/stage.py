"""The ``distill`` and ``finetune`` stages: recovery training of the student on the shared trainer.

Both train on every rank under torchrun (``main_process_only = False``): the trainer wraps the
student in DDP and only rank 0 writes checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgekd.data.bundle import DataBundle
from edgekd.data.transfer import keep_labels, label_counts, labeled_only
from edgekd.distill.config import DistillConfig, FinetuneConfig
from edgekd.distill.hooks import probe, resolve_layer
from edgekd.distill.losses import KDSettings, term_layers
from edgekd.distill.objective import DistillObjective, term_losses
from edgekd.errors import RecipeError, StageError
from edgekd.models.evaluate import top1_accuracy
from edgekd.models.stats import count_params_macs
from edgekd.stage.base import Stage, register_stage
from edgekd.stage.context import LedgerRow, RunContext, ValidationContext
from edgekd.train.config import TrainConfig
from edgekd.train.events import guard_event_text
from edgekd.train.guard import at_chance, chance, kept_share
from edgekd.train.objectives import CrossEntropyObjective, Objective
from edgekd.train.trainer import FitResult, fit


def check_distill_layers(config: DistillConfig, teacher: nn.Module, student: nn.Module,
                         example: torch.Tensor) -> None:
    """Layer names exist, shapes fit each loss, and both models predict the same classes:
    one eval-mode forward of ``example`` through each model. Raises ``RecipeError``."""
    for i, term in enumerate(config.losses):
        s_name, t_name = term_layers(term)
        if s_name is not None:
            resolve_layer(student, s_name, key=f"distill.losses.{i}.student_layer", role="student")
        if t_name is not None:
            resolve_layer(teacher, t_name, key=f"distill.losses.{i}.teacher_layer", role="teacher")
    s_names = sorted({s for s, _ in map(term_layers, config.losses) if s is not None})
    t_names = sorted({t for _, t in map(term_layers, config.losses) if t is not None})
    s_logits, s_feats = probe(student, example, s_names)
    t_logits, t_feats = probe(teacher, example, t_names)
    if s_logits.shape[-1] != t_logits.shape[-1]:
        raise RecipeError(f"the student predicts {s_logits.shape[-1]} classes but the teacher {t_logits.shape[-1]}",
                          key="distill", hint="distillation needs the same classes; set the student's num_classes")
    for i, (term, loss) in enumerate(zip(config.losses, term_losses(config.losses, KDSettings()), strict=True)):
        s_name, t_name = loss.layers()
        if s_name is None or t_name is None:
            continue  # a term on the logits: the class check above covers it
        s_shape, t_shape = s_feats[s_name].shape, t_feats[t_name].shape
        try:
            loss.check(s_shape, t_shape)  # each loss kind's own rule (its registry entry's TermLoss)
        except ValueError as exc:
            raise RecipeError(f"{term.kind}: {exc}: student {s_name!r} gives {tuple(s_shape)}, teacher {t_name!r} "
                              f"gives {tuple(t_shape)}", key=f"distill.losses.{i}") from None


def training_notes(result: FitResult, objective: Objective, config: TrainConfig) -> dict[str, Any]:
    """The ledger row's notes: how the student was trained, in a few words a report reader needs."""
    notes: dict[str, Any] = {"epochs": result.epochs_run, "best_epoch": result.best_epoch, "keep": config.keep,
                             "lr": config.lr, "warmup_epochs": config.warmup_epochs, "grad_clip": config.grad_clip}
    if config.batch_size is not None:
        notes["batch_size"] = config.batch_size
    if result.start_val_accuracy is not None:
        notes["val_at_start"] = round(result.start_val_accuracy, 2)
    if isinstance(objective, DistillObjective):
        notes["loss"] = (f"{'+'.join(term.kind for term in objective.losses)} "
                         f"(T {objective.temperature:g}, alpha {objective.alpha:g})")
        notes["teacher_cache"] = "on" if objective.cache_info.get("enabled") else "off"
    else:
        notes["loss"] = "cross-entropy"
    if config.active_augment is not None:
        notes["augment"] = config.active_augment.summary()
    source = getattr(config, "source", None)
    if source is not None:
        notes["labels"] = f"{source.labeled_fraction:.0%} of the training split kept its labels"
    if result.guard_events:
        notes["guard"] = "; ".join(guard_event_text(e) for e in result.guard_events)
        lowered = [e["peak_lr"] for e in result.guard_events if e.get("peak_lr") is not None]
        if lowered:  # the lr the kept epochs trained at, beside the one the config asked for
            notes["lr_after_rollbacks"] = lowered[-1]
    return notes


def training_data(ctx: RunContext, config) -> DataBundle:
    """The run's data, with labels withheld as the config's ``transfer`` source says (recorded in the report)."""
    source = getattr(config, "source", None)
    if source is None:
        return ctx.data
    data = keep_labels(ctx.data, source.labeled_fraction, ctx.recipe.seed)
    ctx.report_data.setdefault("transfer", {})[type(config).__name__] = {
        "labeled_fraction": source.labeled_fraction, **label_counts(data)}
    return data


def check_alive(result: FitResult, label: str, num_classes: int, guard) -> None:
    """A student that ends training at chance is never handed on (to export, the benchmark, the gate)."""
    if at_chance(result.best_val_accuracy, num_classes, guard.chance_margin):
        raise StageError(
            f"{label}: the student ended at {result.best_val_accuracy:.2f}% val top-1, chance for {num_classes} "
            f"classes (it started at {_pct_or_unknown(result.start_val_accuracy)}); it is not handed on to the "
            f"next stage",
            hint="lower the pruning ratio, train more epochs, or lower lr; the stage's metrics.csv shows each epoch")


def _pct_or_unknown(value: float | None) -> str:
    return f"{value:.2f}%" if value is not None else "an unknown val top-1 (resumed from an older checkpoint)"


def record_training(ctx: RunContext, stage: str, result: FitResult, objective: Objective,
                    config: TrainConfig, share: float | None = None) -> None:
    """The ledger row and the report data of a training stage (``share``: ``start_share``, which set the lr)."""
    example = ctx.data.example_batch(1).to(ctx.device)
    params, macs = count_params_macs(ctx.student, example)
    cache = getattr(objective, "cache_info", None)
    data: dict[str, Any] = {
        "best_val_accuracy": result.best_val_accuracy,
        "best_epoch": result.best_epoch,
        "keep": config.keep,  # the rule that chose best_epoch on the val split (TrainConfig.keep)
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from_epoch,
        "mean_train_time_s": round(result.mean_train_time_s, 4),
        "objective": objective.describe(),
        "augment": config.augment.model_dump() if config.augment is not None else None,
        "history": result.history,
        "val_at_start": result.start_val_accuracy,
        "guard_events": result.guard_events,
        "settings": {"lr": config.lr, "warmup_epochs": config.warmup_epochs, "grad_clip": config.grad_clip,
                     "batch_size": config.batch_size or ctx.data.batch_size, "from_weights": ctx.student_from_weights,
                     "start_share_of_teacher": None if share is None else round(share, 3)},
    }
    if cache is not None and cache.get("enabled"):
        # one cached pass replaced a teacher forward pass in every epoch after the first
        data["teacher_cache"] = {**cache, "estimated_saving_s": round(cache["build_time_s"] * (result.epochs_run - 1), 3)}
    elif cache is not None:
        data["teacher_cache"] = cache
    ctx.report_data[stage] = data
    ctx.ledger.append(LedgerRow(stage=stage, params=params, macs=macs, val_accuracy=result.best_val_accuracy,
                                notes=training_notes(result, objective, config)))
    ctx.stage_outputs.extend(p for p in (result.checkpoint, result.checkpoint.parent / "metrics.csv") if p.is_file())


def start_share(ctx: RunContext) -> float | None:
    """The share of the teacher's val top-1 above chance that the student keeps as its recovery starts
    (``kept_share``); None when the student does not start from trained weights. Picks the recovery lr
    (``_Recovery.concrete``); a resumed run reads the same student, so it takes the same lr."""
    if not ctx.student_from_weights:
        return None
    val_x, val_y = ctx.data.val_tensors()
    student = top1_accuracy(ctx.student, val_x, val_y, device=ctx.device)
    teacher = top1_accuracy(ctx.teacher, val_x, val_y, device=ctx.device)
    return kept_share(student, teacher, chance(ctx.data.num_classes))


@register_stage(DistillConfig)
class DistillStage(Stage[DistillConfig]):
    name = "distill"
    main_process_only = False

    def check(self, ctx: ValidationContext) -> None:
        check_distill_layers(self.config, ctx.teacher, ctx.student, ctx.example_batch)

    def run(self, ctx: RunContext) -> None:
        share = start_share(ctx)
        config = self.config.concrete(ctx.student_from_weights, ctx.data.batch_size, share)
        objective = DistillObjective.from_config(ctx.teacher, config)
        data = training_data(ctx, config)
        result = fit(ctx.student, objective, data, config, ctx.stage_dir(self.name), device=ctx.device,
                     resume=ctx.resume, label=self.name, seed=ctx.recipe.seed, from_weights=ctx.student_from_weights,
                     console=ctx.console)
        check_alive(result, self.name, ctx.data.num_classes, config.guard)
        record_training(ctx, self.name, result, objective, config, share)


@register_stage(FinetuneConfig)
class FinetuneStage(Stage[FinetuneConfig]):
    name = "finetune"
    main_process_only = False

    def run(self, ctx: RunContext) -> None:
        objective = CrossEntropyObjective(label_smoothing=self.config.label_smoothing)
        share = start_share(ctx)
        config = self.config.concrete(ctx.student_from_weights, ctx.data.batch_size, share)
        data = labeled_only(training_data(ctx, config))  # hard labels only: unlabeled inputs teach nothing here
        result = fit(ctx.student, objective, data, config, ctx.stage_dir(self.name), device=ctx.device,
                     resume=ctx.resume, label=self.name, seed=ctx.recipe.seed, from_weights=ctx.student_from_weights,
                     console=ctx.console)
        check_alive(result, self.name, ctx.data.num_classes, config.guard)
        record_training(ctx, self.name, result, objective, config, share)
