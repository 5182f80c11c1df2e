"""The ``lowrank`` stage: replace Linear/Conv layers by two thinner layers (truncated SVD) and report the cost.

Per layer the report gets the weight shape before and after, the scheme (linear, channel or
spatial SVD), the rank and its share of singular-value energy, and the layer's params and MACs
before and after (or why it was left as it is); for the model, the traced params and MACs and
measured latency (teacher, student before and after, exported to ONNX and timed side by side on
ONNX Runtime at the probe's threads and batch sizes), and val top-1 right after factorization
(before any recovery training: a later ``distill``/``finetune`` stage recovers it).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from edgekd.bench.latency import paired_speedup
from edgekd.errors import RecipeError, StageError
from edgekd.fileio import atomic_write_json
from edgekd.lowrank.config import LowRankConfig
from edgekd.lowrank.plan import (
    LayerChoice,
    LayerInfo,
    Search,
    analyse,
    apply_choices,
    choice_at_rank,
    keep_paying_layers,
    largest_saving_rank,
    plan_at_energy,
    plan_for_reduction,
    search_energy,
    totals,
)
from edgekd.models.adapter import close_names_hint, find_layer
from edgekd.models.evaluate import top1_accuracy
from edgekd.models.stats import count_params_macs
from edgekd.prune.latency import export_shipping, measure_models_at, timing_batch
from edgekd.prune.stage import probe_latency
from edgekd.runtimes.registry import get_runtime
from edgekd.stage.base import Stage, register_stage
from edgekd.stage.context import LedgerRow, RunContext, ValidationContext

#: real training samples: one traces the layer shapes, all of them make the timing batches
SAMPLES = 64


def _counts(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    params, macs = count_params_macs(model, example)
    return {"params": params, "macs": macs}


def check_layers(config: LowRankConfig, model: nn.Module, infos: list[LayerInfo]) -> None:
    """Every named layer exists and every fixed rank fits its layer; ``RecipeError`` at the key otherwise."""
    for name in config.ignored_layers:
        if find_layer(model, name) is None:
            raise RecipeError(f"ignored layer {name!r} is not a module of the student", key="lowrank.ignored_layers",
                              hint=close_names_hint(model, name))
    by_id = {id(i.module): i for i in infos}
    for name, rank in config.ranks.items():
        module = find_layer(model, name)
        if module is None:
            raise RecipeError(f"layer {name!r} is not a module of the student", key="lowrank.ranks",
                              hint=close_names_hint(model, name))
        if any(find_layer(model, ignored) is module for ignored in config.ignored_layers):
            raise RecipeError(f"layer {name!r} is in both lowrank.ranks and lowrank.ignored_layers",
                              key="lowrank.ranks", hint="remove it from one of them: ranks factorizes it at the "
                                                        "given rank, ignored_layers leaves it as it is")
        info = by_id.get(id(module))
        if info is None:
            raise RecipeError(f"layer {name!r} is a {type(module).__name__}, not a Linear/Conv1d/Conv2d layer of a "
                              f"kind lowrank.layers ({', '.join(config.layers)}) factorizes, or it is ignored",
                              key="lowrank.ranks", hint="name a Linear or Conv layer, or remove it from ranks")
        if info.unsupported:
            raise RecipeError(f"layer {name!r} cannot be factorized: {info.unsupported}", key="lowrank.ranks",
                              hint="remove it from ranks")
        top = max(info.max_rank(s) for s in info.values)
        if rank > top:
            schemes = ", ".join(f"{s} SVD {info.max_rank(s)}" for s in info.values)
            raise RecipeError(f"rank {rank} for layer {name!r} ({type(module).__name__} {info.shape}) is above the "
                              f"layer's full rank ({schemes})", key="lowrank.ranks",
                              hint=f"give a rank from 1 to {top}; a useful one is well below it")
        choice = choice_at_rank(info, config, rank)
        if choice.skipped:  # the run would leave the layer as it is: say so now rather than in a report row
            useful = largest_saving_rank(info, config)
            raise RecipeError(f"rank {rank} for layer {name!r} ({type(module).__name__} {info.shape}) saves "
                              f"nothing: {choice.skipped}", key="lowrank.ranks",
                              hint=f"give a rank of at most {useful}" if useful is not None
                              else "no rank of this layer costs fewer MACs; remove it from ranks")


def ignored_rows(config: LowRankConfig, model: nn.Module) -> list[dict[str, Any]]:
    """A report row for each layer of ``ignored_layers``: every layer left as it is says why."""
    rows = []
    for name in config.ignored_layers:
        module = find_layer(model, name)
        weight = getattr(module, "weight", None)
        rows.append({"layer": name, "type": type(module).__name__,
                     "shape_before": "x".join(str(d) for d in weight.shape) if isinstance(weight, torch.Tensor) else "",
                     "scheme": None, "skipped": "in lowrank.ignored_layers"})
    return rows


def fixed_ranks(config: LowRankConfig, model: nn.Module) -> dict[int, int]:
    return {id(find_layer(model, name)): rank for name, rank in config.ranks.items()}


def measured_speedup(config: LowRankConfig, student: nn.Module, teacher: nn.Module,
                     samples: torch.Tensor) -> Callable[[list[LayerChoice]], float]:
    """figure(plan): the speed-up over ``teacher`` of ``student`` factorized by the plan, both exported as
    shipped (ONNX) and timed side by side on the target's runtime, threads and batch size (paired ratio)."""
    target = config.speedup
    assert target is not None
    batch = timing_batch(samples, target.batch_size)
    min_time_s = config.probe.min_time_s if config.probe is not None else 0.5

    def figure(choices: list[LayerChoice]) -> float:
        candidate = copy.deepcopy(student)
        apply_choices(candidate, choices, source=student)
        timed = measure_models_at({"teacher": teacher, "student": candidate.eval()}, [batch], threads=target.threads,
                                  min_time_s=min_time_s, runtime=target.runtime, export=export_shipping)[0]
        return paired_speedup(timed["teacher"], timed["student"])

    return figure


def plan(config: LowRankConfig, infos: list[LayerInfo], fixed: dict[int, int], base: dict[str, int],
         teacher: dict[str, int], measure: Callable[[list[LayerChoice]], float] | None = None) -> Search:
    """The choices for the recipe's target: at its energy, or searched for its reduction or measured speed-up
    (``measure``: the figure of a plan, see ``measured_speedup``; needed for a speed-up target)."""
    if config.params_reduction is not None or config.macs_reduction is not None:
        metric = "params" if config.params_reduction is not None else "macs"
        factor = config.params_reduction if metric == "params" else config.macs_reduction
        return plan_for_reduction(infos, config, fixed, base, teacher, metric, factor)
    if config.speedup is not None:
        if measure is None:
            raise ValueError("a speed-up target needs a measure function")
        # measuring costs two exports and a timing run per plan: 8 rounds resolve the energy to 1/256
        search = search_energy(infos, config, fixed, measure, config.speedup.factor, "speedup", rounds=8)
        return keep_paying_layers(search, measure, config.speedup.factor, fixed) if search.reached else search
    choices = plan_at_energy(infos, config, config.energy, fixed)
    return Search(choices, config.energy if config.energy is not None else 1.0, True, [])


@register_stage(LowRankConfig)
class LowRankStage(Stage[LowRankConfig]):
    name = "lowrank"

    def check(self, ctx: ValidationContext) -> None:
        cfg = self.config
        example = ctx.example_batch[:1]
        infos = analyse(ctx.student, example, cfg)
        check_layers(cfg, ctx.student, infos)
        if not any(i.values for i in infos):
            raise RecipeError("the student has no Linear or Conv layer this stage can factorize "
                              f"(layers: {', '.join(cfg.layers)}, ignored: {', '.join(cfg.ignored_layers) or 'none'})",
                              key="lowrank", hint="remove the lowrank stage, or widen lowrank.layers")
        if cfg.speedup is not None:
            get_runtime(cfg.speedup.runtime)  # raises RuntimeUnavailableError when it is not installed
        if cfg.params_reduction is not None or cfg.macs_reduction is not None:
            # the reach of a counted target depends on shapes only: the smallest ranks give the fewest counts
            base = _counts(ctx.student, example)
            search = plan(cfg, infos, fixed_ranks(cfg, ctx.student), base, _counts(ctx.teacher, example))
            if not search.reached:
                metric = "params" if cfg.params_reduction is not None else "macs"
                got = search.trials[-1][f"{metric}_reduction"]
                raise RecipeError(f"{cfg.target_text} is out of reach: the smallest ranks (round_to "
                                  f"{cfg.round_to}) give {got:.2f}x", key=f"lowrank.{metric}_reduction",
                                  hint="lower round_to or min_macs_saving, factorize more layer kinds, ease the "
                                       "target, or prune as well")

    def run(self, ctx: RunContext) -> None:
        cfg = self.config
        samples = ctx.data.calibration_batch(min(SAMPLES, len(ctx.data.train)), seed=ctx.recipe.seed)
        example = samples[:1]
        device = next(ctx.student.parameters()).device
        student = ctx.student.cpu().eval()
        teacher = ctx.teacher if next(ctx.teacher.parameters()).device.type == "cpu" else \
            copy.deepcopy(ctx.teacher).cpu()
        teacher.eval()

        infos = analyse(student, example, cfg)
        check_layers(cfg, student, infos)  # a run from Python skips validate
        before = _counts(student, example)
        teacher_counts = _counts(teacher, example)
        measure = measured_speedup(cfg, student, teacher, samples) if cfg.speedup is not None else None
        search = plan(cfg, infos, fixed_ranks(cfg, student), before, teacher_counts, measure)
        if not search.reached:
            raise StageError(f"lowrank: {cfg.target_text} is out of reach even at the smallest ranks "
                             f"({search.trials[-1]})", hint="ease the target or lower round_to")
        unfactorized = copy.deepcopy(student)
        replaced = apply_choices(student, search.choices)
        student.eval()
        after = _counts(student, example)
        expected = totals(search.choices, before)
        if after["params"] != expected["params"]:  # the per-layer arithmetic must match the tracer
            raise StageError(f"lowrank: {after['params']} params after factorization, the plan counted "
                             f"{expected['params']}")

        same_as_teacher = teacher_counts == before
        timed = {"teacher": teacher, **({} if same_as_teacher else {"student_before": unfactorized}),
                 "student": student}
        latency = probe_latency(timed, samples, cfg) if replaced else []  # reads only cfg.probe
        accuracy = top1_accuracy(student, *ctx.data.val_tensors())
        accuracy_before = top1_accuracy(unfactorized, *ctx.data.val_tensors())

        data: dict[str, Any] = {
            "target": cfg.target_text,
            "energy": round(search.energy, 6),
            "conv_scheme": cfg.conv_scheme,
            "round_to": cfg.round_to,
            "ignored_layers": cfg.ignored_layers,
            "ranks": cfg.ranks,
            "layers_factorized": replaced,
            "teacher": teacher_counts,
            "before": before,
            "after": after,
            "macs_reduction_vs_teacher": round(teacher_counts["macs"] / after["macs"], 3),
            "params_reduction_vs_teacher": round(teacher_counts["params"] / after["params"], 3),
            # per layer: shape before/after, scheme, rank, max rank, energy kept, params/MACs before and after
            "layers": [c.row() for c in search.choices] + ignored_rows(cfg, student),
            "latency": latency,
            "val_accuracy_before": round(accuracy_before, 3),
            "val_accuracy_after": round(accuracy, 3),
            "search": search.trials,
        }
        ctx.report_data["lowrank"] = data
        report_file = ctx.stage_dir("lowrank") / "lowrank.json"
        atomic_write_json(report_file, data)
        ctx.stage_outputs.append(report_file)
        notes: dict[str, Any] = {"target": cfg.target_text, "energy": data["energy"], "layers_factorized": replaced}
        if latency:
            notes["ort_speedup"] = {f"bs{r['batch_size']}x{r['threads']}t": r["speedup_vs_teacher"] for r in latency}
        ctx.ledger.append(LedgerRow(stage="lowrank", params=after["params"], macs=after["macs"],
                                    val_accuracy=accuracy, notes=notes))
        ctx.console.print(f"lowrank: {replaced} layer(s) factorized at energy {search.energy:.4f}; params "
                          f"{before['params']:,} -> {after['params']:,}, MACs {before['macs']:,} -> {after['macs']:,}; "
                          f"val top-1 {accuracy_before:.2f}% -> {accuracy:.2f}%")
        ctx.student = student.to(device)
