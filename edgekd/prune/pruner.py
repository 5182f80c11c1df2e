"""How many channels each layer keeps, and cutting them, on torch-pruning's dependency graph.

torch-pruning decides *what is coupled* (the dependency graph: a conv's output channels, its
BatchNorm, the next layer's inputs, residual partners) and *which channels* (the importance
criterion). Three of its "how many" rules give slow or broken models, so they are changed here:

- ``round_to`` rounds kept channels *down*, and when that reaches zero it silently skips the
  layer: ResNet-56 at 70% with ``round_to=8`` left all 16-wide layers unpruned (49 MMACs,
  1.9x measured). ``EdgePruner`` rounds to the *nearest* multiple, at least one multiple
  (16.6 MMACs, 4.0x measured; batch 32, 1 ONNX Runtime thread, tools/bench_prune.py).
- with global ranking the per-layer cap (``max_pruning_ratio``) is only checked between
  iterative steps, so a one-shot step can still cut a layer to a few channels. Here each
  group is trimmed to the cap before it is cut (``PruningPlan._cap_group``).
- attention heads: see ``PruningPlan``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from edgekd.errors import ModelError
from edgekd.models.adapter import LogitsAdapter
from edgekd.prune.attention import SplitHeadAttention, split_attention_heads
from edgekd.prune.config import PruneConfig
from edgekd.prune.importance import build_importance

WIDTH_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


# -- layer names ----------------------------------------------------------------------------
def _run_with_layer_hooks(model: nn.Module, example: torch.Tensor, on_layer) -> torch.Tensor:
    """One eval-mode forward with ``on_layer(name, module, output)`` called for each conv/linear."""
    handles = [m.register_forward_hook(lambda mod, _i, out, name=n: on_layer(name, mod, out))
               for n, m in model.named_modules() if isinstance(m, WIDTH_LAYERS)]
    was_training = model.training
    try:
        with torch.no_grad():
            return model.eval()(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


def _out_width(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def find_classifier(model: nn.Module, example: torch.Tensor) -> str:
    """The name of the layer that produces the logits: the last Linear/Conv run in forward
    whose output width equals the number of logits (pruning its outputs would drop classes)."""
    calls: list[tuple[str, int]] = []
    logits = _run_with_layer_hooks(model, example, lambda name, mod, _out: calls.append((name, _out_width(mod))))
    for name, width in reversed(calls):
        if width == logits.shape[-1]:
            return name
    if calls:
        return calls[-1][0]
    raise ModelError(f"{type(model).__name__} has no Linear or Conv layer to prune")


def _candidate_names(model: nn.Module, name: str) -> list[str]:
    """A user names layers in their own model; a ``LogitsAdapter`` adds a ``model.`` prefix."""
    return [name, f"model.{name}"] if isinstance(model, LogitsAdapter) else [name]


def resolve_layer(model: nn.Module, name: str) -> nn.Module | None:
    modules = dict(model.named_modules())
    return next((modules[c] for c in _candidate_names(model, name) if c in modules), None)


def unknown_layer_hint(model: nn.Module, name: str) -> str:
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(model, LogitsAdapter):
        names = [n.removeprefix("model.") for n in names]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    if close:
        return f"did you mean {' or '.join(repr(c) for c in close)}?"
    shown = [n for n in names if "." not in n][:12]
    return f"top-level modules are: {', '.join(shown)}"


# -- layer widths for the report -------------------------------------------------------------
def layer_widths(model: nn.Module) -> dict[str, dict[str, int | str]]:
    """Output width of every conv/linear layer and the head count of every attention layer."""
    table: dict[str, dict[str, int | str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.MultiheadAttention, SplitHeadAttention)):
            table[f"{name}#heads"] = {"type": "attention heads", "width": module.num_heads}
        elif isinstance(module, nn.Linear):
            table[name] = {"type": "Linear", "width": module.out_features}
        elif isinstance(module, nn.modules.conv._ConvNd):
            depthwise = module.groups > 1 and module.groups == module.in_channels
            table[name] = {"type": type(module).__name__ + (" (depthwise)" if depthwise else ""),
                           "width": module.out_channels}
    return table


def layer_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates of each conv/linear layer for one sample (to rank layers by cost)."""
    macs: dict[str, int] = {}

    def record(name: str, module: nn.Module, output: torch.Tensor) -> None:
        per_output = module.in_features if isinstance(module, nn.Linear) else \
            (module.in_channels // module.groups) * math.prod(module.kernel_size)
        macs[name] = int(output.numel() // max(1, output.shape[0]) * per_output)

    _run_with_layer_hooks(model, example[:1], record)
    return macs


def channel_rows(before: dict[str, dict], after: dict[str, dict]) -> list[dict[str, int | str | None]]:
    """Side-by-side rows (a layer only one side has, e.g. after an attention swap, shows None)."""
    rows = []
    for name in [*before, *(n for n in after if n not in before)]:
        old, new = before.get(name), after.get(name)
        rows.append({"layer": name, "type": (new or old)["type"],  # type: ignore[index]
                     "before": old["width"] if old else None, "after": new["width"] if new else None})
    return rows


# -- the pruner -------------------------------------------------------------------------------
def _round_keep(keep: float, current: int, multiple: int) -> int:
    """Channels to keep: the nearest multiple of ``multiple``, at least one multiple, at most ``current``."""
    if current <= multiple:
        return current
    return min(current, max(multiple, int(round(keep / multiple)) * multiple))


class EdgePruner(tp.pruner.BasePruner):
    """torch-pruning's pruner with nearest-multiple rounding (see the module docstring)."""

    def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
        keep = _round_keep(current_channels - n_pruned, current_channels, round_to)
        return current_channels - keep


def _mha_head_multiple(model: nn.Module) -> int:
    """``nn.MultiheadAttention`` needs embed_dim divisible by num_heads after pruning."""
    multiple = 1
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            multiple = math.lcm(multiple, module.num_heads)
    return multiple


def _head_keep(initial: int, ratio: float, max_ratio: float) -> int:
    """Heads an attention layer keeps at channel ratio ``ratio``: nearest count, at least one,
    and no fewer than ``max_ratio`` allows."""
    return max(1, math.ceil(initial * (1 - max_ratio) - 1e-9), round(initial * (1 - ratio)))


@dataclass
class PruningPlan:
    """A built pruner and what it was built with; ``step()`` cuts one iterative step.

    Attention heads are cut by this class, not by torch-pruning's head code: there a head
    count is recomputed from the *current* heads each step (4 heads at 25/50/75% end with 0)
    and global ranking can empty one layer. Here every layer keeps the nearest count to its
    *initial* heads times (1 - ratio), and at least one head; the ``qkv`` projections are
    ignored by the channel pruner so head dimensions stay whole.
    """

    model: nn.Module
    pruner: EdgePruner
    config: PruneConfig
    ignored: list[str]
    swapped_attention: list[str] = field(default_factory=list)
    initial_heads: dict[SplitHeadAttention, int] = field(default_factory=dict)

    @property
    def steps_left(self) -> int:
        return self.pruner.iterative_steps - self.pruner.current_step

    def step(self) -> None:
        was_training = self.model.training
        self.model.eval()
        try:
            ratio = self.pruner.per_step_pruning_ratio[self.pruner.current_step + 1]
            for attention, initial in self.initial_heads.items():
                self._prune_heads(attention, _head_keep(initial, ratio, self.config.max_layer_ratio))
            for group in self.pruner.step(interactive=True):
                group = self._cap_group(group) if self.pruner.global_pruning else group
                if group is not None:
                    group.prune()
        finally:
            self.model.train(was_training)

    def _prune_heads(self, attention: SplitHeadAttention, keep: int) -> None:
        """Remove the least important heads of ``attention`` until ``keep`` remain."""
        drop = attention.num_heads - keep
        if drop <= 0:
            return
        dg, width = self.pruner.DG, attention.head_dim
        # rooted at the output projection's inputs, a group covers the q, k and v rows of each dim
        full = dg.get_pruning_group(attention.proj, tp.prune_linear_in_channels, list(range(attention.proj.in_features)))
        scores = self.pruner.estimate_importance(full)
        if scores is None:  # a criterion that scores no layer here (bn_scale): fall back to magnitude
            scores = tp.importance.GroupMagnitudeImportance(p=2)(full)
        per_head = scores.view(attention.num_heads, width).mean(1)
        heads = torch.argsort(per_head)[:drop].tolist()
        idxs = [h * width + d for h in sorted(heads) for d in range(width)]
        dg.get_pruning_group(attention.proj, tp.prune_linear_in_channels, idxs).prune()
        attention.num_heads = keep

    def _cap_group(self, group):
        """Trim a group so its root layer keeps at least (1 - max_layer_ratio) of its channels."""
        dep, idxs = group[0].dep, list(group[0].idxs)
        module, handler = dep.target.module, dep.handler
        dg = self.pruner.DG
        if not isinstance(module, WIDTH_LAYERS):
            return group
        out = dg.is_out_channel_pruning_fn(handler)
        current = dg.get_out_channels(module) if out else dg.get_in_channels(module)
        initial = (self.pruner.layer_init_out_ch if out else self.pruner.layer_init_in_ch).get(module, current)
        multiple = self.pruner.round_to or 1
        min_keep = min(initial, math.ceil(initial * (1 - self.config.max_layer_ratio)))
        min_keep = min(current, _round_keep(math.ceil(min_keep / multiple) * multiple, initial, multiple))
        allowed = current - min_keep
        if len(idxs) <= allowed:
            return group
        if allowed <= 0:
            return None
        full = dg.get_pruning_group(module, handler, list(range(current)))
        scores = self.pruner.estimate_importance(full)
        if scores is None:
            return group
        chosen = sorted(idxs, key=lambda i: float(scores[i]))[:allowed]
        return dg.get_pruning_group(module, handler, sorted(chosen))


def _resolve_all(model: nn.Module, names: list[str], what: str) -> list[nn.Module]:
    modules = []
    for name in names:
        module = resolve_layer(model, name)
        if module is None:
            raise ModelError(f"{what} {name!r} is not a module of the model", hint=unknown_layer_hint(model, name))
        modules.append(module)
    return modules


def build_plan(model: nn.Module, example: torch.Tensor, config: PruneConfig, *, ratio: float, steps: int,
               layer_ratios: dict[str, float] | None = None,
               importance: tp.importance.Importance | None = None) -> PruningPlan:
    """Build the torch-pruning pruner for ``model`` (changed in place by ``PruningPlan.step``).

    ``ratio`` is the channel ratio reached after ``steps`` steps; ``layer_ratios`` gives some
    layers (by name) another one. With ``config.prune_heads`` self-attention modules are first
    swapped for head-prunable ones.
    """
    example = example[:1].contiguous()
    was_training = model.training
    model.eval()
    try:
        swapped = split_attention_heads(model, example) if config.prune_heads else []
        classifier = find_classifier(model, example)
        ignored_names = [classifier, *config.ignored_layers]
        ignored = _resolve_all(model, ignored_names, "ignored layer")
        attention = [m for m in model.modules() if isinstance(m, SplitHeadAttention)]
        # q/k/v widths change only by whole heads (PruningPlan._prune_heads), never channel by channel
        ignored += [m.qkv for m in attention]
        multiple = math.lcm(config.round_to or 1, _mha_head_multiple(model))
        names = list(layer_ratios or {})
        per_layer = dict(zip(_resolve_all(model, names, "layer"), (layer_ratios or {}).values(), strict=True))
        pruner = EdgePruner(
            model, example,
            importance=importance or build_importance(config.importance),
            global_pruning=config.scope == "global",
            pruning_ratio=ratio,
            pruning_ratio_dict=per_layer or None,
            max_pruning_ratio=config.max_layer_ratio,
            iterative_steps=steps,
            round_to=multiple if multiple > 1 else None,
            ignored_layers=ignored,
            # fresh dicts: torch-pruning 1.6.1 mutates these default arguments across instances
            in_channel_groups={},
            out_channel_groups={},
            num_heads={},
        )
    finally:
        model.train(was_training)
    heads = {m: m.num_heads for m in attention} if config.prune_heads else {}
    return PruningPlan(model=model, pruner=pruner, config=config, ignored=ignored_names, swapped_attention=swapped,
                       initial_heads=heads)


def missing_layers(model: nn.Module, names: Iterable[str]) -> list[str]:
    return [n for n in names if resolve_layer(model, n) is None]
