"""Which layers to factorize, by which scheme and at which rank; costs counted per sample.

``analyse`` finds every factorizable layer (``nn.Linear``; ``nn.Conv1d``/``nn.Conv2d`` with one group,
zero padding) and records what one real sample's forward shows about it (output positions, input
size), and the singular values of each scheme's matrix. ``plan_at_energy`` then picks, per layer, the
scheme and rank that keep a share of the singular-value energy, and skips a layer whose factorization
would not cut its MACs (with the reason). ``plan_for_reduction`` searches the one energy threshold,
the largest, at which the whole model meets a params or MACs reduction.

MACs here are multiply-accumulates for one sample, counted as torch-pruning counts a Linear/Conv
(weight elements × output positions); the stage reports the traced totals beside them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from edgekd.lowrank.config import LowRankConfig
from edgekd.lowrank.modules import ChannelLowRankConv, LowRankLinear, SpatialLowRankConv2d
from edgekd.lowrank.svd import channel_matrix, energy_kept, rank_for_energy, singular_values, spatial_matrix
from edgekd.models.adapter import find_layer, layer_names

SCHEMES = ("linear", "channel", "spatial")


@dataclass
class LayerInfo:
    """One factorizable layer: its name (as the user writes it), the module, and what a forward showed."""

    name: str
    module: nn.Module
    kind: str  # "linear", "conv1d" or "conv2d"
    #: output positions per sample: rows for a Linear (1 for (N, in) inputs, tokens for (N, T, in)),
    #: output pixels/steps for a conv
    positions: int
    #: Conv2d: input height and width (spatial SVD's first conv keeps the input width)
    in_hw: tuple[int, int] | None = None
    out_hw: tuple[int, int] | None = None
    #: singular values of each applicable scheme's matrix, descending
    values: dict[str, Tensor] = field(default_factory=dict)
    #: why the layer cannot be factorized at all (grouped conv, 1x1 conv, ...), else None
    unsupported: str | None = None

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters(recurse=False))

    @property
    def macs(self) -> int:
        return self.module.weight.numel() * self.positions

    @property
    def shape(self) -> str:
        return "x".join(str(s) for s in self.module.weight.shape)

    def max_rank(self, scheme: str) -> int:
        return len(self.values[scheme])

    def cost(self, scheme: str, rank: int) -> tuple[int, int]:
        """(params, MACs per sample) of the layer factorized at ``rank`` by ``scheme``."""
        w = self.module.weight
        bias = 0 if self.module.bias is None else self.module.bias.numel()
        if scheme == "linear":
            per = rank * (w.shape[0] + w.shape[1])
            return per + bias, per * self.positions
        if scheme == "channel":
            first, second = rank * w[0].numel(), w.shape[0] * rank
            return first + second + bias, (first + second) * self.positions
        out_c, in_c, kh, kw = w.shape  # spatial
        first, second = rank * in_c * kh, out_c * rank * kw
        assert self.in_hw is not None and self.out_hw is not None
        # the first (kh x 1) conv runs at the output height and the full input width
        first_positions = self.out_hw[0] * self.in_hw[1]
        return first + second + bias, first * first_positions + second * self.out_hw[0] * self.out_hw[1]

    def build(self, scheme: str, rank: int) -> nn.Module:
        if scheme == "linear":
            return LowRankLinear.factorize(self.module, rank)
        if scheme == "channel":
            return ChannelLowRankConv.factorize(self.module, rank)
        return SpatialLowRankConv2d.factorize(self.module, rank)


@dataclass
class LayerChoice:
    """The decision for one layer: factorized (scheme and rank) or left as it is (``skipped`` says why)."""

    info: LayerInfo
    scheme: str | None = None
    rank: int | None = None
    energy: float | None = None
    params: int | None = None
    macs: int | None = None
    skipped: str | None = None

    def row(self) -> dict[str, Any]:
        """The report row: shapes before/after, rank, energy kept, params and MACs before/after."""
        info = self.info
        row: dict[str, Any] = {"layer": info.name, "type": type(info.module).__name__, "shape_before": info.shape,
                               "params_before": info.params, "macs_before": info.macs}
        if self.skipped is not None:
            row.update({"scheme": None, "skipped": self.skipped})
            return row
        w = info.module.weight
        r = self.rank
        dims = "x".join(str(d) for d in w.shape[1:])
        if self.scheme == "linear":  # in -> r -> out
            after = f"{w.shape[1]}->{r}->{w.shape[0]}"
        elif self.scheme == "channel":  # (r, in, *k) conv then (out, r) 1x1
            after = f"{r}x{dims} + {w.shape[0]}x{r}" + "x1" * (w.dim() - 2)
        else:  # (r, in, kh, 1) conv then (out, r, 1, kw)
            after = f"{r}x{w.shape[1]}x{w.shape[2]}x1 + {w.shape[0]}x{r}x1x{w.shape[3]}"
        row.update({"scheme": self.scheme, "rank": r, "max_rank": info.max_rank(self.scheme),
                    "energy_kept": round(self.energy, 4), "shape_after": after,
                    "params_after": self.params, "macs_after": self.macs})
        return row


def _user_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> the layer name as a user writes it (without LogitsAdapter's ``model.`` prefix)."""
    return {id(find_layer(model, name)): name for name in layer_names(model)}


def _unsupported(module: nn.Module) -> str | None:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups}): each group is already a thin layer"
        if module.padding_mode != "zeros":
            return f"padding_mode {module.padding_mode!r}: the factors would pad twice"
    return None


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    return None


def analyse(model: nn.Module, example: Tensor, config: LowRankConfig) -> list[LayerInfo]:
    """Every Linear/Conv layer of ``model`` of a kind ``config.layers`` names, in module order, with the
    positions one forward of ``example`` (one sample, shaped (1, *input_shape)) shows. Ignored layers
    and layers already factorized are left out; unsupported ones are kept with the reason."""
    names = _user_names(model)
    ignored = {id(find_layer(model, n)) for n in config.ignored_layers}
    wanted = {"linear"} if config.layers == ["linear"] else {"conv1d", "conv2d"} if config.layers == ["conv"] \
        else {"linear", "conv1d", "conv2d"}
    infos: dict[int, LayerInfo] = {}
    handles = []
    for _, module in model.named_modules():
        kind = _kind(module)
        if kind not in wanted or id(module) in ignored or id(module) not in names:
            continue
        info = LayerInfo(name=names[id(module)], module=module, kind=kind, positions=1,
                         unsupported=_unsupported(module))
        infos[id(module)] = info

        def hook(mod: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, info: LayerInfo = info) -> None:
            out = output if isinstance(output, Tensor) else output[0]
            if info.kind == "linear":
                info.positions = max(1, out[0].numel() // out.shape[-1])
            else:
                info.positions = math.prod(out.shape[2:])
                if info.kind == "conv2d":
                    info.in_hw, info.out_hw = tuple(inputs[0].shape[2:]), tuple(out.shape[2:])

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for info in infos.values():
        w = info.module.weight
        if info.unsupported:
            continue
        if info.kind == "linear":
            info.values["linear"] = singular_values(w)
            continue
        if config.conv_scheme in ("auto", "channel") or info.kind == "conv1d":
            info.values["channel"] = singular_values(channel_matrix(w))
        if info.kind == "conv2d" and config.conv_scheme in ("auto", "spatial") and min(w.shape[2:]) > 1 \
                and not isinstance(info.module.padding, str):
            info.values["spatial"] = singular_values(spatial_matrix(w))
        if not info.values:
            info.unsupported = "spatial SVD needs a kxk kernel (k > 1) and numeric padding; use conv_scheme: auto"
    return list(infos.values())


def _round(rank: int, round_to: int | None, max_rank: int) -> int:
    if round_to:
        rank = math.ceil(rank / round_to) * round_to
    return min(rank, max_rank)


def _choose(info: LayerInfo, config: LowRankConfig, energy: float | None, fixed: int | None) -> LayerChoice:
    """The cheapest scheme (fewest MACs) at ``energy`` (rank rounded up by ``round_to``), or at the fixed rank."""
    if info.unsupported:
        return LayerChoice(info, skipped=info.unsupported)
    options = []
    for scheme, values in info.values.items():
        if fixed is not None:
            if fixed > len(values):
                continue
            rank = fixed
        else:
            rank = _round(rank_for_energy(values, energy), config.round_to, len(values))
        params, macs = info.cost(scheme, rank)
        options.append(LayerChoice(info, scheme, rank, energy_kept(values, rank), params, macs))
    if not options:  # a fixed rank above every scheme's (check() refuses it before a run)
        return LayerChoice(info, skipped=f"rank {fixed} is above the layer's full rank")
    best = min(options, key=lambda c: (c.macs, c.params))
    limit = info.macs * (1.0 - config.min_macs_saving)
    if best.macs >= limit:
        best_text = f"{best.scheme} SVD at rank {best.rank} ({100 * best.energy:.1f}% energy)"
        return LayerChoice(info, skipped=f"{best_text} costs {best.macs:,} MACs, not fewer than the layer's "
                                         f"{info.macs:,}" + (f" x (1 - {config.min_macs_saving:g})"
                                                             if config.min_macs_saving else ""))
    return best


def choice_at_rank(info: LayerInfo, config: LowRankConfig, rank: int) -> LayerChoice:
    """The cheapest scheme of ``info``'s layer at a fixed ``rank`` (``skipped`` says why when none saves MACs)."""
    return _choose(info, config, None, rank)


def largest_saving_rank(info: LayerInfo, config: LowRankConfig) -> int | None:
    """The largest rank at which some scheme of the layer costs fewer MACs than the layer (less
    ``min_macs_saving``); None when no rank does."""
    limit = info.macs * (1.0 - config.min_macs_saving)
    ranks = [r for scheme in info.values for r in range(1, info.max_rank(scheme) + 1)
             if info.cost(scheme, r)[1] < limit]
    return max(ranks, default=None)


def plan_at_energy(infos: list[LayerInfo], config: LowRankConfig, energy: float | None,
                   fixed: dict[int, int]) -> list[LayerChoice]:
    """One choice per layer at ``energy`` (None: only layers with a fixed rank); ``fixed``: id(module) -> rank."""
    choices = []
    for info in infos:
        rank = fixed.get(id(info.module))
        if rank is None and energy is None:
            choices.append(LayerChoice(info, skipped="no rank given for this layer (ranks only)"))
            continue
        choices.append(_choose(info, config, energy, rank))
    return choices


def totals(choices: list[LayerChoice], base: dict[str, int]) -> dict[str, int]:
    """The model's params/MACs with the chosen layers factorized (``base``: the unfactorized model's counts)."""
    params, macs = base["params"], base["macs"]
    for c in choices:
        if c.skipped is None:
            params += c.params - c.info.params
            macs += c.macs - c.info.macs
    return {"params": params, "macs": macs}


@dataclass
class Search:
    choices: list[LayerChoice]
    energy: float
    reached: bool
    #: (energy tried, params, MACs) in order
    trials: list[dict[str, Any]]


def plan_for_reduction(infos: list[LayerInfo], config: LowRankConfig, fixed: dict[int, int],
                       base: dict[str, int], teacher: dict[str, int], metric: str, factor: float,
                       rounds: int = 30) -> Search:
    """The largest energy threshold (shared by every layer) whose plan gives teacher[metric] / student[metric]
    >= ``factor``; see ``search_energy``."""
    def figure(choices: list[LayerChoice]) -> float:
        return teacher[metric] / max(1, totals(choices, base)[metric])

    return search_energy(infos, config, fixed, figure, factor, f"{metric}_reduction", rounds)


def search_energy(infos: list[LayerInfo], config: LowRankConfig, fixed: dict[int, int],
                  figure: Callable[[list[LayerChoice]], float], factor: float, label: str,
                  rounds: int = 30) -> Search:
    """The largest energy threshold (shared by every layer) whose plan has ``figure(plan) >= factor``:
    bisection in (0, 1], since kept energy, rank and cost grow together (a measured figure is only
    roughly monotone; the search still ends). ``reached`` is False when even the smallest ranks miss
    the target (the plan at the lowest energy is returned). ``figure`` is called once per distinct plan."""
    seen: dict[tuple, float] = {}

    def measure(energy: float) -> tuple[list[LayerChoice], float]:
        choices = plan_at_energy(infos, config, energy, fixed)
        key = tuple((c.scheme, c.rank) for c in choices)
        if key not in seen:  # rounding maps nearby energies to one plan: measure it once
            seen[key] = figure(choices)
        return choices, seen[key]

    trials = []
    lo, hi = 1e-6, 1.0
    choices, got = measure(hi)
    trials.append({"energy": hi, label: round(got, 4)})
    if got >= factor:
        return Search(choices, hi, True, trials)
    low_choices, got = measure(lo)
    trials.append({"energy": lo, label: round(got, 4)})
    if got < factor:
        return Search(low_choices, lo, False, trials)
    best = (low_choices, lo)
    for _ in range(rounds):
        mid = (lo + hi) / 2
        choices, got = measure(mid)
        trials.append({"energy": round(mid, 6), label: round(got, 4)})
        if got >= factor:
            lo, best = mid, (choices, mid)
        else:
            hi = mid
        if hi - lo < 1e-4:
            break
    return Search(best[0], best[1], True, trials)


#: a factorized layer left whole costs at most this share of the measured speed-up: it did not pay
PAID_TOLERANCE = 0.02


def keep_paying_layers(search: Search, figure: Callable[[list[LayerChoice]], float], factor: float,
                       fixed: dict[int, int], tolerance: float = PAID_TOLERANCE) -> Search:
    """Each factorized layer of ``search`` (not one of ``fixed``'s), in module order, tried left whole: when the
    plan without it still meets ``factor`` and measures at least (1 - ``tolerance``) x the plan with it, the
    factorization did not pay on the runtime and the layer is kept whole (the exact layer, at no accuracy
    cost). A bisection on one energy threshold for every layer cannot see this: a thin head or a layer
    whose two halves each cost a kernel launch can be slower factorized while the rest pays. One
    ``figure`` (two exports and a timing run) per factorized layer; each trial is appended to the trials."""
    choices, trials = list(search.choices), list(search.trials)
    current = figure(choices)
    for i, choice in enumerate(choices):
        if choice.skipped is not None or id(choice.info.module) in fixed:
            continue
        trial = [*choices[:i], LayerChoice(choice.info, skipped="measured"), *choices[i + 1:]]
        got = figure(trial)
        trials.append({"energy": round(search.energy, 6), "left_whole": choice.info.name, "speedup": round(got, 4)})
        if got >= factor and got >= (1.0 - tolerance) * current:
            trial[i] = LayerChoice(choice.info, skipped=f"measured {got:.2f}x with it whole, {current:.2f}x with it "
                                                         "factorized: the factorization did not pay on the runtime")
            choices, current = trial, got
    return Search(choices, search.energy, search.reached, trials)


def apply_choices(model: nn.Module, choices: list[LayerChoice], source: nn.Module | None = None) -> int:
    """Replace every factorized layer in ``model`` by its two-layer version; returns how many were replaced.

    ``source``: the model the choices were planned on, when ``model`` is a copy of it (same weights):
    layers are then found in ``model`` by their path in ``source``."""
    by_id = {id(m): name for name, m in (source or model).named_modules()}
    done = 0
    for c in choices:
        if c.skipped is not None:
            continue
        path = by_id[id(c.info.module)]
        parent_name, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, c.info.build(c.scheme, c.rank))
        done += 1
    return done
