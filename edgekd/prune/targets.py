"""How much to prune: reach a channel ratio, a MACs/params reduction, a latency or a speed-up.

A ratio is applied directly (in ``config.steps`` iterative steps). Every other target is a
search over the channel ratio: prune a copy of the student at a ratio, measure the figure
(count MACs/params, or export to ONNX and time it on ONNX Runtime), and prune again at the
next ratio: first the largest allowed ratio (if even that misses, the target is unreachable),
then bisection over ``search_step`` multiples, then ``refine`` finer rounds, so the student
is pruned as little as the target allows. The objective is picked by the target's type.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgekd.bench.latency import paired_speedup
from edgekd.errors import ModelError, TargetUnreachableError
from edgekd.models.fold import fold_weight_norm
from edgekd.models.stats import count_params_macs
from edgekd.prune.config import (
    LatencyTarget,
    PruneConfig,
    PruneTarget,
    RatioTarget,
    ReductionTarget,
    SpeedupTarget,
)
from edgekd.prune.importance import NEEDS_GRADIENTS, accumulate_taylor_gradients
from edgekd.prune.latency import measure_models, timing_batch
from edgekd.prune.pruner import GroupBroke, PruningPlan, build_plan, layer_macs, layer_widths
from edgekd.prune.safety import GroupFailure, inner_model

#: timing of one search trial: at least this long and this many side-by-side rounds per model.
#: With 0.3 s and 5 rounds a ResNet-20 (batch 32) read 2.23x where 1.84x was true on this shared
#: machine; 20 rounds steadied it.
SEARCH_TIMING = {"min_time_s": 0.5, "min_iters": 20}
#: the chosen candidate is timed again for longer before it is accepted
VERIFY_TIMING = {"min_time_s": 2.0, "min_iters": 40}

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
#: called after each iterative step with (model, step, steps, channel ratio reached): BatchNorm
#: recalibration, accuracy and recovery training between steps (``edgekd.prune.iterative``); step 1
#: again means a restart
AfterStep = Callable[[nn.Module, int, int, float], None]


@dataclass
class PruneEnv:
    """What pruning reads besides the student: real samples, the teacher, training batches."""

    config: PruneConfig
    samples: torch.Tensor  # a few real inputs: tracing and timing batches
    teacher: nn.Module
    gradient_batches: Batches | None = None  # (x, y) batches for Taylor importance


@dataclass
class PruneOutcome:
    model: nn.Module
    ratio: float
    target: str  # the target in words
    reached: str  # the figure reached, in words
    ignored_layers: list[str]
    swapped_attention: list[str]
    trials: list[dict[str, Any]] = field(default_factory=list)
    layout: str = ""  # how the channel ratio was applied when not uniformly ("with 3 layer(s) at 0.253")
    plan: PruningPlan | None = None  # the plan that cut ``model`` (reasons for layers kept whole)
    layer_ratios: dict[str, float] | None = None  # layers pruned at another ratio than ``ratio``


# -- pruning one model at one ratio -------------------------------------------------------
#: groups that may break the model before pruning gives up (each retry rebuilds the graph)
MAX_BROKEN_GROUPS = 32


def prune_at_ratio(model: nn.Module, env: PruneEnv, ratio: float,
                   layer_ratios: dict[str, float] | None = None, after_step: AfterStep | None = None) -> PruningPlan:
    """Prune ``model`` in place to ``ratio`` (``layer_ratios`` for some layers by name) in
    ``config.steps`` iterative steps; ``after_step(model, step, steps, channel_ratio)`` runs after
    each one (a restart after a broken group calls it from step 1 again).

    Weight normalisation is folded first. A coupled group torch-pruning cannot score, or whose
    cut breaks the forward (``GroupBroke``), is kept whole: the model is restored and pruned
    again with that group's root layer ignored; ``plan.failures`` lists those groups. Raises
    ``ModelError`` naming the first failed layer when nothing could be pruned at all.
    """
    config = env.config
    fold_weight_norm(model)
    backup = copy.deepcopy(model)
    kept: list[GroupFailure] = []
    for _ in range(MAX_BROKEN_GROUPS + 1):
        plan = build_plan(model, env.samples, config, ratio=ratio, steps=config.steps, layer_ratios=layer_ratios,
                          kept_whole=kept)
        try:
            steps = plan.steps_left
            for step in range(1, steps + 1):
                if config.importance in NEEDS_GRADIENTS:
                    # fresh gradients each step: the previous step (and its recovery) changed the network
                    accumulate_taylor_gradients(model, _require(env.gradient_batches)(), config.taylor_batches)
                plan.step()
                if after_step is not None:
                    model.zero_grad(set_to_none=True)
                    after_step(model, step, steps, plan.pruner.per_step_pruning_ratio[plan.pruner.current_step])
        except GroupBroke as broke:
            _restore(model, backup)
            if any(f.root == broke.failure.root for f in kept):  # keeping it whole did not help
                raise ModelError(f"pruning breaks the model even with layer {broke.failure.root!r} kept whole: "
                                 f"{broke.failure.reason()}",
                                 hint="remove the prune stage or choose a student architecture") from broke
            kept.append(broke.failure)
            continue
        finally:
            model.zero_grad(set_to_none=True)
        # each iterative step scores a refused group again: one entry per group
        plan.failures = list({(f.root, f.operation): f for f in [*kept, *plan.pruner.failures]}.values())
        for failure in plan.pruner.failures:
            for layer in failure.layers:
                plan.reasons.setdefault(layer, failure.reason())
        if ratio > 0 and plan.failures and _unchanged(model, backup):
            first = plan.failures[0]
            raise ModelError(
                f"nothing in {type(inner_model(model)).__name__} could be pruned: the first group that failed is "
                f"rooted at layer {first.root!r} ({', '.join(first.layers[:4])}), {first.reason()}",
                hint=f"ignored_layers: [{first.root}] keeps that group whole; this model has no other prunable "
                     "group, so remove the prune stage or choose a student architecture")
        return plan
    first = kept[0]
    raise ModelError(f"pruning broke {len(kept)} coupled groups in turn; the first was rooted at layer "
                     f"{first.root!r}: {first.reason()}",
                     hint=f"add the failing layers to prune.ignored_layers, e.g. ignored_layers: "
                          f"[{', '.join(f.root for f in kept[:4])}]")


def _restore(model: nn.Module, backup: nn.Module) -> None:
    """Put ``model`` back to ``backup``'s structure and weights, in place (callers hold ``model``)."""
    fresh = copy.deepcopy(backup)
    model.__dict__.clear()
    model.__dict__.update(fresh.__dict__)


def _unchanged(model: nn.Module, backup: nn.Module) -> bool:
    shapes = [tuple(p.shape) for p in model.state_dict().values()]
    return shapes == [tuple(p.shape) for p in backup.state_dict().values()]


def _require(batches: Batches | None) -> Batches:
    if batches is None:
        raise TargetUnreachableError("Taylor importance needs training batches and none were given",
                                     hint="use importance l2 or pass training data")
    return batches


# -- objectives: one per target type --------------------------------------------------------
class Objective(ABC):
    """A figure measured on a candidate, and whether it meets the target."""

    #: a timed figure varies from run to run: the search's choice is measured again before use
    noisy: bool = False

    @abstractmethod
    def measure(self, model: nn.Module, timing: dict[str, float] = SEARCH_TIMING) -> float: ...

    @abstractmethod
    def met(self, figure: float) -> bool: ...

    @abstractmethod
    def better(self, a: float, b: float) -> bool: ...

    @abstractmethod
    def describe(self) -> str: ...

    @abstractmethod
    def format(self, figure: float) -> str: ...


class ReductionObjective(Objective):
    """Teacher MACs (or params) / candidate MACs (or params), counted by torch-pruning's tracer."""

    def __init__(self, target: ReductionTarget, env: PruneEnv) -> None:
        self.target, self.example = target, env.samples[:1]
        self.index = 0 if target.metric == "params" else 1
        self.teacher_count = count_params_macs(env.teacher, self.example)[self.index]

    def measure(self, model: nn.Module, timing: dict[str, float] = SEARCH_TIMING) -> float:
        return self.teacher_count / count_params_macs(model, self.example)[self.index]

    def met(self, figure: float) -> bool:
        return figure >= self.target.factor

    def better(self, a: float, b: float) -> bool:
        return a > b

    def describe(self) -> str:
        return f"{self.target.metric} reduction {self.target.factor:g}x over the teacher"

    def format(self, figure: float) -> str:
        return f"{figure:.2f}x {self.target.metric} reduction"


class LatencyObjective(Objective):
    noisy = True

    def __init__(self, target: LatencyTarget, env: PruneEnv) -> None:
        self.target = target
        self.batch = timing_batch(env.samples, target.batch_size)

    def measure(self, model: nn.Module, timing: dict[str, float] = SEARCH_TIMING) -> float:
        timed = measure_models({"student": model}, self.batch, threads=self.target.threads, **timing)
        return timed["student"].p50_ms

    def met(self, figure: float) -> bool:
        return figure <= self.target.ms

    def better(self, a: float, b: float) -> bool:
        return a < b

    def describe(self) -> str:
        t = self.target
        return f"latency {t.ms:g} ms ({t.runtime}, {t.threads} thread(s), batch {t.batch_size})"

    def format(self, figure: float) -> str:
        return f"{figure:.3f} ms"


class SpeedupObjective(Objective):
    noisy = True

    def __init__(self, target: SpeedupTarget, env: PruneEnv) -> None:
        self.target, self.teacher = target, env.teacher
        self.batch = timing_batch(env.samples, target.batch_size)

    def measure(self, model: nn.Module, timing: dict[str, float] = SEARCH_TIMING) -> float:
        timed = measure_models({"teacher": self.teacher, "student": model}, self.batch,
                               threads=self.target.threads, **timing)
        return paired_speedup(timed["teacher"], timed["student"])

    def met(self, figure: float) -> bool:
        return figure >= self.target.factor

    def better(self, a: float, b: float) -> bool:
        return a > b

    def describe(self) -> str:
        t = self.target
        return f"speed-up {t.factor:g}x over the teacher ({t.runtime}, {t.threads} thread(s), batch {t.batch_size})"

    def format(self, figure: float) -> str:
        return f"{figure:.2f}x measured speed-up"


OBJECTIVES: dict[type, Callable[[Any, PruneEnv], Objective]] = {
    ReductionTarget: ReductionObjective,
    LatencyTarget: LatencyObjective,
    SpeedupTarget: SpeedupObjective,
}


# -- reaching a target -------------------------------------------------------------------------
def _reach_ratio(model: nn.Module, env: PruneEnv, target: RatioTarget,
                 after_step: AfterStep | None = None) -> PruneOutcome:
    plan = prune_at_ratio(model, env, target.ratio, after_step=after_step)
    return PruneOutcome(model=model, ratio=target.ratio, target=f"channel ratio {target.ratio:g}",
                        reached=f"channel ratio {target.ratio:g}", ignored_layers=plan.ignored,
                        swapped_attention=plan.swapped_attention, plan=plan)


def _search_grid(config: PruneConfig) -> list[float]:
    top = config.max_layer_ratio
    grid = [round(k * config.search_step, 6) for k in range(1, int(top / config.search_step) + 1)]
    return [r for r in grid if r < top] + [top]


def _search(model: nn.Module, env: PruneEnv, objective: Objective) -> PruneOutcome:
    config = env.config
    trials: list[dict[str, Any]] = []
    figures: dict[tuple, float] = {}
    widths: dict[tuple, dict[str, dict]] = {}
    # only the least-pruned candidate that meets the target is kept; keys order candidates by
    # how much they prune: (ratio, 0) for a uniform ratio, (low, k) for low + k layers at a higher one
    kept: dict[tuple, tuple[nn.Module, PruningPlan]] = {}
    layouts: dict[tuple, dict[str, float] | None] = {}
    measured: dict[tuple, float] = {}  # by layer shapes: rounding maps nearby ratios to one structure

    def trial(ratio: float, key: tuple | None = None, layer_ratios: dict[str, float] | None = None) -> bool:
        key = key or (ratio, 0)
        candidate = copy.deepcopy(model)
        plan = prune_at_ratio(candidate, env, ratio, layer_ratios)
        shapes = tuple((name, tuple(p.shape)) for name, p in candidate.state_dict().items())
        if shapes not in measured:
            measured[shapes] = objective.measure(candidate)
        figure = figures[key] = measured[shapes]
        layouts[key] = layer_ratios
        widths[key] = layer_widths(candidate)
        met = objective.met(figure)
        trials.append({"ratio": round(ratio, 4), "layers_at_higher_ratio": key[1], "figure": round(figure, 4),
                       "met": met})
        if met and all(key < k for k in kept):
            kept.clear()
            kept[key] = (candidate, plan)
        return met

    def outcome(key: tuple, higher: float | None = None) -> PruneOutcome:
        candidate, plan = kept[key]
        where = f" with {key[1]} layer(s) at {higher:.3f}" if key[1] else ""
        return PruneOutcome(model=candidate, ratio=key[0], target=objective.describe(),
                            reached=objective.format(figures[key]) + where, ignored_layers=plan.ignored,
                            swapped_attention=plan.swapped_attention, trials=trials, layout=where, plan=plan,
                            layer_ratios=layouts.get(key))

    grid = _search_grid(config)
    if trial(0.0):  # the unpruned student already meets it
        return _verified(model, env, objective, outcome((0.0, 0)), figures)
    if not trial(grid[-1]):
        best = grid[-1] if objective.better(figures[(grid[-1], 0)], figures[(0.0, 0)]) else 0.0
        raise TargetUnreachableError(
            f"prune target {objective.describe()} is out of reach: the best reached was "
            f"{objective.format(figures[(best, 0)])} at channel ratio {best:.2f} "
            f"(max_layer_ratio {config.max_layer_ratio}, round_to {config.round_to})",
            hint="raise max_layer_ratio, lower round_to, ignore fewer layers, or ease the target")
    lo, hi = -1, len(grid) - 1  # grid[hi] meets the target; ratio 0 (index -1) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if trial(grid[mid]):
            hi = mid
        else:
            lo = mid
    low, high = (grid[lo] if lo >= 0 else 0.0), grid[hi]
    for _ in range(config.refine):
        mid = round((low + high) / 2, 6)
        if trial(mid):
            high = mid
        else:
            low = mid
    chosen = outcome((high, 0))
    if config.refine and config.scope == "per_layer":
        chosen = _mix_layers(model, env, trial, outcome, widths, low, high)
    return _verified(model, env, objective, chosen, figures)


def _mix_layers(model, env, trial, outcome, widths, low: float, high: float) -> PruneOutcome:
    """Between a uniform ratio that misses (``low``) and the next structure that meets the
    target (``high``), rounding can jump far (ResNet-20's 16-wide layers go 16 -> 8 at once).
    Move the layers that differ to ``high`` one prefix at a time, costliest first, and bisect
    on the prefix length: a finer step between the two structures."""
    before, after = widths[(low, 0)], widths[(high, 0)]
    differ = [n for n in after if n in before and not n.endswith("#heads") and before[n]["width"] != after[n]["width"]]
    macs = layer_macs(model, env.samples)
    differ.sort(key=lambda n: -macs.get(n, 0))
    lo, hi = 0, len(differ)  # prefix lengths: 0 is the `low` structure, all is the `high` one
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if trial(low, (low, mid), {n: high for n in differ[:mid]}):
            hi = mid
        else:
            lo = mid
    return outcome((low, hi), high) if hi < len(differ) else outcome((high, 0))


def _verified(model: nn.Module, env: PruneEnv, objective: Objective, chosen: PruneOutcome,
              figures: dict[tuple, float]) -> PruneOutcome:
    """Time the chosen candidate again, longer; if it now misses, try the next more-pruned ratio
    that met the target in the search. The outcome reports the verified figure."""
    if not objective.noisy:
        return chosen
    more_pruned = sorted(r for (r, k), f in figures.items() if k == 0 and r > chosen.ratio and objective.met(f))
    candidates = [(chosen.ratio, chosen)] + [(r, None) for r in more_pruned]
    best: tuple[float, float] | None = None
    for ratio, ready in candidates:
        if ready is None:
            candidate = copy.deepcopy(model)
            plan = prune_at_ratio(candidate, env, ratio)
            ready = PruneOutcome(model=candidate, ratio=ratio, target=chosen.target, reached="",
                                 ignored_layers=plan.ignored, swapped_attention=plan.swapped_attention,
                                 trials=chosen.trials, plan=plan)
        figure = objective.measure(ready.model, VERIFY_TIMING)
        chosen.trials.append({"ratio": round(ratio, 4), "verify": True, "figure": round(figure, 4),
                              "met": objective.met(figure)})
        if objective.met(figure):
            ready.reached = objective.format(figure) + ready.layout
            return ready
        if best is None or objective.better(figure, best[1]):
            best = (ratio, figure)
    assert best is not None
    raise TargetUnreachableError(
        f"prune target {objective.describe()} was met in the search but not when timed again: the best "
        f"re-timed figure was {objective.format(best[1])} at channel ratio {best[0]:.2f}",
        hint="the machine may be busy; ease the target a little or measure on a quieter machine")


def reach_target(model: nn.Module, env: PruneEnv, after_step: AfterStep | None = None) -> PruneOutcome:
    """Prune ``model`` to ``env.config.target``. The returned model may be a new object
    (a searched candidate); use ``outcome.model``. Raises ``TargetUnreachableError``.

    ``after_step`` (recovery between iterative steps) runs on the pruning that is kept: for a
    searched target, candidates are pruned without it and the chosen layout is pruned again with
    it from ``model`` (the same layer widths: counts depend on the ratios, not on the weights)."""
    target: PruneTarget = env.config.target
    if isinstance(target, RatioTarget):
        return _reach_ratio(model, env, target, after_step)
    original = copy.deepcopy(model) if after_step is not None and env.config.steps > 1 else None
    outcome = _search(model, env, OBJECTIVES[type(target)](target, env))
    if original is None or outcome.ratio <= 0:
        return outcome
    plan = prune_at_ratio(original, env, outcome.ratio, outcome.layer_ratios, after_step=after_step)
    outcome.model, outcome.plan = original, plan
    return outcome
