"""The ``prune`` stage: cut the student's channels to the recipe's target and report the cost.

The report gets counted figures (parameters and MACs from torch-pruning's tracer), the width
of every layer before and after, and measured latency: teacher and student exported to ONNX
and timed side by side on ONNX Runtime at the probe's thread count and batch sizes.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from edgekd.bench.latency import paired_speedup
from edgekd.errors import EdgekdError, ModelError, RecipeError
from edgekd.fileio import atomic_write_json
from edgekd.models.batchnorm import recalibrate_batchnorm
from edgekd.models.evaluate import top1_accuracy
from edgekd.models.stats import count_params_macs
from edgekd.prune.config import LatencyTarget, PruneConfig, RatioTarget, ReductionTarget, SpeedupTarget
from edgekd.prune.importance import NEEDS_BATCHNORM, NEEDS_GRADIENTS, has_batchnorm
from edgekd.prune.iterative import StepRecorder, student_alive
from edgekd.prune.latency import export_shipping, measure_models_at, timing_batch
from edgekd.prune.pruner import (
    channel_rows,
    kept_whole_rows,
    layer_widths,
    missing_layers,
    unknown_layer_hint,
)
from edgekd.prune.targets import PruneEnv, ReductionObjective, prune_at_ratio, reach_target
from edgekd.runtimes.registry import get_runtime
from edgekd.stage.base import Stage, register_stage
from edgekd.stage.context import LedgerRow, RunContext, ValidationContext
from edgekd.train.guard import kept_share

#: real training samples used to trace the graph and to build timing batches
SAMPLES = 64


def _cpu_copy_if_needed(model: nn.Module) -> nn.Module:
    """ONNX export and timing run on the CPU; leave the caller's model where it is."""
    param = next(model.parameters(), None)
    return model if param is None or param.device.type == "cpu" else copy.deepcopy(model).cpu()


def _counts(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    params, macs = count_params_macs(model, example)
    return {"params": params, "macs": macs}


def probe_latency(models: dict[str, nn.Module], samples: torch.Tensor, config: PruneConfig) -> list[dict[str, Any]]:
    """Rows of measured ONNX Runtime latency (ms, p50/p90) per model and batch size, timed side by side."""
    probe = config.probe
    if probe is None:
        return []
    rows = []
    batches = [timing_batch(samples, batch_size) for batch_size in probe.batch_sizes]
    measured = measure_models_at(models, batches, threads=probe.threads, min_time_s=probe.min_time_s,
                                 export=export_shipping)
    for batch_size, timed in zip(probe.batch_sizes, measured, strict=True):
        row: dict[str, Any] = {"runtime": "onnxruntime", "threads": probe.threads, "batch_size": batch_size}
        for name, stats in timed.items():
            row[name] = {"p50_ms": round(stats.p50_ms, 4), "p90_ms": round(stats.p90_ms, 4), "iters": stats.iters}
        # paired: the median of teacher/student over back-to-back calls (see paired_speedup)
        row["speedup_vs_teacher"] = round(paired_speedup(timed["teacher"], timed["student"]), 3)
        rows.append(row)
    return rows


def _val_before(model: nn.Module, ctx: RunContext) -> tuple[float, bool]:
    """The unpruned student's val top-1 (%) and whether it is above chance: a student dead before pruning (an
    untrained student model) is not pruned again in steps, recovery between cuts would not be the cause."""
    val_x, val_y = ctx.data.val_tensors()
    accuracy = top1_accuracy(model.eval(), val_x, val_y)
    return accuracy, bool(student_alive(model, val_x[:64], accuracy, ctx.data.num_classes)["alive"])


@register_stage(PruneConfig)
class PruneStage(Stage[PruneConfig]):
    name = "prune"

    # -- validation (no training, untrained models, one real batch) -------------------------------
    def check(self, ctx: ValidationContext) -> None:
        cfg = self.config
        missing = missing_layers(ctx.student, cfg.ignored_layers)
        if missing:
            raise RecipeError(f"ignored layer {missing[0]!r} is not a module of the student",
                              key="prune.ignored_layers", hint=unknown_layer_hint(ctx.student, missing[0]))
        if cfg.importance in NEEDS_BATCHNORM and not has_batchnorm(ctx.student):
            raise RecipeError(f"importance {cfg.importance!r} ranks channels by BatchNorm scale, but the "
                              f"student has no BatchNorm layer", key="prune.importance",
                              hint="use l1, l2, lamp or taylor for this model")
        if isinstance(cfg.target, (LatencyTarget, SpeedupTarget)):
            get_runtime(cfg.target.runtime)  # raises RuntimeUnavailableError when it is not installed
        self._check_prunes(ctx)

    def _check_prunes(self, ctx: ValidationContext) -> None:
        """Prune a copy (to the ratio, or to the largest allowed ratio for a counted target): the
        model must trace, still run, and a MACs/params target must be reachable at all."""
        cfg = self.config
        # structure only: weights are untrained here, and Taylor would need training batches
        probe_cfg = cfg.model_copy(update={"importance": "l2"} if cfg.importance in NEEDS_GRADIENTS else {})
        target = cfg.target
        ratio = target.ratio if isinstance(target, RatioTarget) else cfg.max_layer_ratio
        env = PruneEnv(config=probe_cfg, samples=ctx.example_batch, teacher=ctx.teacher)
        candidate = copy.deepcopy(ctx.student)
        try:
            prune_at_ratio(candidate, env, ratio)
            with torch.no_grad():
                out = candidate.eval()(ctx.example_batch)
        except ModelError as exc:  # nothing prunable, or a group that breaks the model: named by layer
            raise RecipeError(exc.message, key="prune", hint=exc.hint) from exc
        except EdgekdError:
            raise
        except Exception as exc:  # noqa: BLE001 - the pruned copy's forward, in a user model
            raise RecipeError(f"the pruned student no longer runs: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''}", key="prune",
                              hint="add the layer named in the message to prune.ignored_layers, or remove the "
                                   "prune stage") from exc
        if out.shape[-1] != ctx.num_classes:
            raise RecipeError(f"the pruned student predicts {out.shape[-1]} classes, not {ctx.num_classes}",
                              key="prune.ignored_layers", hint="ignore the layer that produces the logits")
        if isinstance(target, ReductionTarget):
            objective = ReductionObjective(target, env)
            best = objective.measure(candidate)
            if not objective.met(best):
                key = f"prune.{target.metric}_reduction"
                raise RecipeError(f"{objective.describe()} is out of reach: pruning every layer by "
                                  f"max_layer_ratio {cfg.max_layer_ratio} gives {objective.format(best)}",
                                  key=key, hint="raise max_layer_ratio, lower round_to, or ease the target")

    # -- the run -------------------------------------------------------------------------------------
    def run(self, ctx: RunContext) -> None:
        cfg = self.config
        samples = ctx.data.calibration_batch(min(SAMPLES, len(ctx.data.train)), seed=ctx.recipe.seed)
        example = samples[:1]
        device = next(ctx.student.parameters()).device
        student = ctx.student.cpu().eval()
        teacher = _cpu_copy_if_needed(ctx.teacher).eval()

        before = {**_counts(student, example), "widths": layer_widths(student)}
        teacher_counts = _counts(teacher, example)
        # a separate "student before" column only when it is not simply the teacher
        same_as_teacher = teacher_counts == {"params": before["params"], "macs": before["macs"]}
        unpruned = None if same_as_teacher else copy.deepcopy(student)

        def train_batches():
            return ctx.data.train_loader(cfg.batch_size, seed=ctx.recipe.seed)

        def attempt(config: PruneConfig, model: nn.Module, workdir: str):
            """Prune ``model`` in place with ``config``: (outcome, recorder, widths/counts after, BatchNorm
            batches recalibrated, val top-1 %, the alive verdict)."""
            env = PruneEnv(config=config, samples=samples, teacher=teacher, gradient_batches=train_batches)
            # after every step: BatchNorm recalibration, accuracy; between steps: recovery training
            recorder = StepRecorder(config=config, data=ctx.data, teacher=teacher,
                                    workdir=ctx.stage_dir("prune") / workdir, device=ctx.device, seed=ctx.recipe.seed)
            outcome = reach_target(model, env, after_step=recorder)
            pruned = outcome.model.eval()
            after = {**_counts(pruned, example), "widths": layer_widths(pruned)}
            changed = (after["params"], after["macs"]) != (before["params"], before["macs"])
            if recorder.rows:  # the last step was recalibrated by the recorder
                recalibrated = recorder.recalibrated
            else:
                recalibrated = recalibrate_batchnorm(pruned, train_batches(), config.bn_recalibration_batches) \
                    if changed else 0
            pruned.eval()
            accuracy = top1_accuracy(pruned, *ctx.data.val_tensors())
            alive = student_alive(pruned, ctx.data.val_tensors(64)[0], accuracy, ctx.data.num_classes)
            return outcome, recorder, after, changed, recalibrated, accuracy, alive

        # one-shot first; a student it leaves dead (thin layers whose cuts compound: HF MobileViT at 50% is at
        # chance after one cut although every coupling is mapped) is pruned again from the unpruned weights in
        # auto_steps steps with recovery between them, which keeps the student learning between cuts
        auto = cfg.steps == 1 and cfg.auto_steps > 1 and isinstance(cfg.target, RatioTarget)
        unpruned_copy = copy.deepcopy(student) if auto else None
        outcome, recorder, after, changed, recalibrated, accuracy, alive = attempt(cfg, student, "recovery")
        auto_steps: dict[str, Any] | None = None
        before_val = _val_before(unpruned_copy, ctx) if unpruned_copy is not None and changed else None
        share = None if before_val is None else kept_share(accuracy, before_val[0], alive["chance_accuracy"])
        crippled = share is not None and (not alive["alive"] or share < cfg.auto_steps_below)
        if before_val is not None and before_val[1] and crippled:
            stepped_cfg = cfg.model_copy(update={"steps": cfg.auto_steps})
            retry = attempt(stepped_cfg, unpruned_copy, "auto-steps")
            state = (f"at chance (chance {alive['chance_accuracy']:.1f}%, forward finite: {alive['finite']})"
                     if not alive["alive"] else
                     f"keeping {share:.0%} of the unpruned student's {before_val[0]:.1f}% above chance "
                     f"(prune.auto_steps_below: {cfg.auto_steps_below:g})")
            auto_steps = {"steps": cfg.auto_steps, "one_shot_val_accuracy": round(accuracy, 3),
                          "unpruned_val_accuracy": round(before_val[0], 3), "kept_share": round(share, 3),
                          "stepped_val_accuracy": round(retry[5], 3), "kept": "stepped" if retry[5] > accuracy
                          else "one-shot",
                          "why": f"one-shot pruning left the student at {accuracy:.1f}% val, {state}; pruned "
                                 f"again in {cfg.auto_steps} steps with {cfg.recovery.epochs} recovery epoch(s) "
                                 "between them (prune.auto_steps: 0 turns this off)"}
            if retry[5] > accuracy:
                outcome, recorder, after, changed, recalibrated, accuracy, alive = retry
                cfg = stepped_cfg
        pruned = outcome.model.eval()
        kept_whole = kept_whole_rows(before["widths"], after["widths"], outcome.plan, outcome.ratio) \
            if outcome.plan is not None else []

        timed = {"teacher": teacher, **({"student_before": unpruned} if unpruned is not None else {}),
                 "student": pruned}
        latency = probe_latency(timed, samples, cfg)
        if changed and not recorder.rows:  # a searched target pruned in one step: the candidate kept
            recorder.rows.append({"step": 1, "channel_ratio": outcome.ratio, "params": after["params"],
                                  "macs": after["macs"], "val_accuracy": round(accuracy, 3),
                                  "alive": alive["alive"], "finite": alive["finite"]})

        data = {
            "importance": cfg.importance,
            "scope": cfg.scope,
            "round_to": cfg.round_to,
            "max_layer_ratio": cfg.max_layer_ratio,
            "target": outcome.target,
            "reached": outcome.reached,
            "channel_ratio": outcome.ratio,
            "ignored_layers": outcome.ignored_layers,
            "attention_heads_split": outcome.swapped_attention,
            "teacher": teacher_counts,
            "before": {"params": before["params"], "macs": before["macs"]},
            "after": {"params": after["params"], "macs": after["macs"]},
            "macs_reduction_vs_teacher": round(teacher_counts["macs"] / after["macs"], 3),
            "params_reduction_vs_teacher": round(teacher_counts["params"] / after["params"], 3),
            "channels": channel_rows(before["widths"], after["widths"]),
            "latency": latency,
            "bn_recalibration_batches": recalibrated,
            "val_accuracy_after_prune": round(accuracy, 3),
            "alive": alive,
            # one row per iterative step: {step, channel_ratio, params, macs, val_accuracy, alive, recovery}
            "steps": recorder.rows,
            "recovery": (cfg.recovery.model_dump() if cfg.steps > 1 else None),
            # set when the one-shot student was dead and the stage pruned again in steps (what each gave)
            "auto_steps": auto_steps,
            **({"recovery_skipped": recorder.skipped} if recorder.skipped else {}),
            # every prunable layer left at full width or cut less than asked, and why
            "kept_whole": kept_whole,
            "groups_kept_whole": [{"root": f.root, "layers": f.layers, "reason": f.reason()}
                                  for f in (outcome.plan.failures if outcome.plan is not None else [])],
            "traced_training_path": bool(outcome.plan and outcome.plan.train_path),
            "search": outcome.trials,
        }
        ctx.report_data["prune"] = data
        report_file = ctx.stage_dir("prune") / "prune.json"
        atomic_write_json(report_file, data)
        ctx.stage_outputs.append(report_file)
        notes = {"target": outcome.target, "reached": outcome.reached, "channel_ratio": outcome.ratio}
        if len(recorder.rows) > 1:
            notes["val_by_step"] = recorder.notes()
        if auto_steps is not None:
            notes["auto_steps"] = (f"one-shot {auto_steps['one_shot_val_accuracy']:.1f}% "
                                   f"({auto_steps['kept_share']:.0%} kept above chance) -> "
                                   f"{auto_steps['steps']} steps {auto_steps['stepped_val_accuracy']:.1f}%, kept "
                                   f"{auto_steps['kept']}")
        if latency:
            notes["ort_speedup"] = {f"bs{r['batch_size']}x{r['threads']}t": r["speedup_vs_teacher"] for r in latency}
        ctx.ledger.append(LedgerRow(stage="prune", params=after["params"], macs=after["macs"],
                                    val_accuracy=accuracy, notes=notes))
        ctx.student = pruned.to(device)
