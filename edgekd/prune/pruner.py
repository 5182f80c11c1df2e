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

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from edgekd.errors import ModelError
from edgekd.models.adapter import close_names_hint, find_layer
from edgekd.prune.attention import SplitHeadAttention, split_attention_heads
from edgekd.prune.config import PruneConfig
from edgekd.prune.graph_rules import (
    ReshapeState,
    chunk_gates,
    cut_broadcast_inputs,
    guard_groups,
    reached_unmapped,
    reshape_rule,
    stop_fixed_splits,
    stop_reasons,
)
from edgekd.prune.heads import HeadLayout, find_head_layouts
from edgekd.prune.importance import build_importance
from edgekd.prune.packed_heads import SINGLE_HEAD_REASON, find_packed_layouts
from edgekd.prune.safety import (
    GroupFailure,
    OpOwners,
    Probe,
    describe_failure,
    module_names,
    out_layers,
    owner_text,
    train_mode_forward,
    train_outputs_differ,
)

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


# one resolver of user layer names for pruning and distillation (a ``LogitsAdapter`` adds ``model.``)
resolve_layer = find_layer
unknown_layer_hint = close_names_hint


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
    """torch-pruning's pruner with nearest-multiple rounding (see the module docstring), rounding
    per channel group (grouped convs, GroupNorm, heads), and groups it cannot score kept whole.

    torch-pruning rounds the count pruned *per channel group* against the layer's *whole* width
    (a groups=4 conv of 32 channels losing 4 of each group's 8 was rounded back to 0 pruned with
    round_to 8). Here the per-group count is rounded to lcm(groups, round_to) / groups channels
    per group, so a layer keeps a multiple of both where its width allows.
    """

    _rounding_group = None

    def __init__(self, *args, **kwargs) -> None:
        self.failures: list[GroupFailure] = []
        self.last_root: nn.Module | None = None
        self.reshapes = ReshapeState()  # reshapes torch-pruning cannot map channels through
        self.chunk_gates: dict[nn.Module, int] = {}  # layers whose output halves are multiplied together
        model = args[0] if args else kwargs["model"]
        # the module owning each functional op, recorded during the trace, names it in reasons
        with reshape_rule(self.reshapes), OpOwners(model) as owners:
            super().__init__(*args, **kwargs)
        self.DG.edgekd_owners = owners.owners
        guard_groups(self.DG, self.reshapes)
        # a split whose section sizes the forward passes as numbers keeps the width of what it splits
        stop_fixed_splits(self.DG, self.reshapes, owners.funcs, lambda node: _op_text(node, owners.owners, model))
        # a 1-channel gate broadcast over the features leaves their channels free
        broadcast = cut_broadcast_inputs(self.DG)
        gates = chunk_gates(self.DG)
        if gates:
            self.chunk_gates = gates
            self.out_channel_groups.update(gates)
        # a mapped channel shuffle: its feeding conv loses whole units (groups on both sides)
        shuffled = {m: k for m, k in self.reshapes.shuffle_groups.items() if k > self.out_channel_groups.get(m, 1)}
        self.out_channel_groups.update(shuffled)
        if shuffled:
            # the units are channel groups in the producer's order: its group must be rooted there
            # (torch-pruning roots a group at the first of its layers in module2node), not at a
            # depthwise conv after the shuffle, whose channel order is permuted
            first = {m: self.DG.module2node[m] for m in shuffled if m in self.DG.module2node}
            self.DG.module2node = {**first, **{m: n for m, n in self.DG.module2node.items() if m not in first}}
        if gates or broadcast or shuffled:
            self.initial_total_channels = self._count_channels()

    def _count_channels(self) -> int:
        """torch-pruning's initial channel count for global ranking (``BasePruner.__init__``), again
        once channel groups were added after the graph was built."""
        total = 0
        for group in self.DG.get_all_groups(ignored_layers=self.ignored_layers, root_module_types=self.root_module_types):
            if self._is_atten_group(group)[0]:
                group = self._downstream_node_as_root_if_attention(group)
                if group is None:
                    continue
            total += self.DG.get_out_channels(group[0][0].target.module) // self._get_channel_groups(group)
        return total

    def _is_atten_group(self, group):
        # called for each group right before its count is rounded (torch-pruning 1.6.1 _prune)
        self._rounding_group = group
        return super()._is_atten_group(group)

    def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
        group = self._rounding_group
        groups = self._get_channel_groups(group) if group is not None else 1
        per_group = current_channels // max(1, groups)
        multiple = max(1, math.lcm(groups, round_to) // groups)
        if group is not None and any(dep.target.module in self.chunk_gates for dep, _ in group):
            multiple = round_to  # each chunk of a gate feeds the next layer: it keeps the multiple
        keep = _round_keep(per_group - n_pruned, per_group, multiple)
        return per_group - keep

    def estimate_importance(self, group):
        """Score a group; a group torch-pruning cannot map (an IndexError from a split with stored
        sizes, a channel shuffle) is recorded and kept whole (``None`` skips it)."""
        if reached_unmapped(group):
            why, by_design = stop_reasons(group, self.reshapes)
            self.failures.append(describe_failure(group, self.model, self.DG, "index mapping", why,
                                                  root=group[0].dep.target.module, by_design=by_design))
            return None
        try:
            return self.importance(group)
        except Exception as exc:  # noqa: BLE001 - torch-pruning's index mapping failing on user code
            self.failures.append(describe_failure(group, self.model, self.DG, "scoring", exc,
                                                  root=group[0].dep.target.module))
            return None


def _op_text(node, owners: dict, model: nn.Module) -> str:
    """``torch.split in block1.spatial (PartialConv.forward)`` for a traced functional node."""
    owner = owners.get(node.grad_fn)
    return f"torch.split in {owner_text(owner, model)}" if owner is not None else "torch.split"


class GroupBroke(Exception):
    """Pruning one group broke the model (raised inside ``PruningPlan.step``; the caller restores
    the model and prunes again with the group's root layer kept whole)."""

    def __init__(self, failure: GroupFailure) -> None:
        super().__init__(failure.reason())
        self.failure = failure


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

    Attention heads of edgekd's ``SplitHeadAttention`` are cut by this class, not by
    torch-pruning's head code: there a head count is recomputed from the *current* heads each
    step (4 heads at 25/50/75% end with 0) and global ranking can empty one layer. Here every
    layer keeps the nearest count to its *initial* heads times (1 - ratio), and at least one head;
    the ``qkv`` projections are ignored by the channel pruner so head dimensions stay whole.
    Attention modules that keep their head layout in attributes (``HeadLayout``: Hugging Face,
    timm) get the same per-step head count through torch-pruning's ``num_heads`` and
    ``head_pruning_ratio_dict``, and their attributes are updated after each group.

    After each group is cut the model must still run with the same output shapes (``probe``);
    otherwise ``GroupBroke`` names the group (see ``edgekd.prune.targets.prune_at_ratio``).
    """

    model: nn.Module
    pruner: EdgePruner
    config: PruneConfig
    ignored: list[str]
    probe: Probe
    swapped_attention: list[str] = field(default_factory=list)
    initial_heads: dict[SplitHeadAttention, int] = field(default_factory=dict)
    head_layouts: list[HeadLayout] = field(default_factory=list)
    layout_heads: dict[HeadLayout, int] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # layer -> why it is kept whole or cut less
    failures: list[GroupFailure] = field(default_factory=list)  # groups kept whole (filled by the caller too)
    train_path: bool = False  # traced through the training-mode forward (train-only outputs)
    fused_heads: dict[HeadLayout, int] = field(default_factory=dict)  # fused layouts -> initial heads

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
            for layout, initial in self.fused_heads.items():
                self._drop_fused_heads(layout, _head_keep(initial, ratio, self.config.max_layer_ratio))
            self._set_head_ratios(ratio)
            groups = self.pruner.step(interactive=True)
            while True:
                try:
                    group = next(groups, None)
                except GroupBroke:
                    raise
                except Exception as exc:  # noqa: BLE001 - torch-pruning failed building a group
                    root = self.pruner.last_root
                    raise GroupBroke(describe_failure(None, self.model, self.pruner.DG, "grouping", exc,
                                                      root=root)) from exc
                if group is None:
                    break
                group = self._cap_group(group) if self.pruner.global_pruning else group
                if group is None:
                    continue
                self._prune_checked(group)
        finally:
            self.model.train(was_training)

    def _prune_checked(self, group, after=None) -> None:
        """Cut one group, update head attributes (``after``: more of them), and check the model still runs."""
        try:
            group.prune()
            if after is not None:
                after()
        except Exception as exc:  # noqa: BLE001 - torch-pruning's own pruning functions on user layers
            raise GroupBroke(describe_failure(group, self.model, self.pruner.DG, "pruning", exc,
                                              root=group[0].dep.target.module)) from exc
        self._update_head_attributes()
        why = self.probe.failure(self.model)
        if why is not None:
            raise GroupBroke(describe_failure(group, self.model, self.pruner.DG, "pruning", why,
                                              root=group[0].dep.target.module))

    def _drop_fused_heads(self, layout: HeadLayout, keep: int) -> None:
        if not layout.drop_heads(keep):
            return
        why = self.probe.failure(self.model)
        if why is not None:
            names = module_names(self.model)
            qkv = names.get(layout.projections[0], layout.name)
            raise GroupBroke(GroupFailure(root=qkv, layers=[qkv], operation="head pruning",
                                          ops=f"the heads of {layout.name}", cause=why))

    def _set_head_ratios(self, ratio: float) -> None:
        """Per-layer head ratios that take each ``HeadLayout`` from its current heads to the nearest
        count to its initial heads times (1 - ratio) (torch-pruning removes ceil(r * current))."""
        total_now = total_keep = 0
        for layout, initial in self.layout_heads.items():
            current = self.pruner.num_heads.get(layout.projections[0], layout.heads)
            keep = min(current, _head_keep(initial, ratio, self.config.max_layer_ratio))
            r = (current - keep - 0.5) / current if current > keep else 0.0
            for proj in layout.projections:
                self.pruner.head_pruning_ratio_dict[proj] = [r] * (self.pruner.iterative_steps + 1)
            total_now, total_keep = total_now + current, total_keep + keep
        if self.layout_heads and self.pruner.initial_total_heads:
            # global ranking: removes len(all heads) - int(initial_total * (1 - r)) heads
            r = 1 - (total_keep + 0.5) / self.pruner.initial_total_heads
            self.pruner.per_step_head_pruning_ratio = [max(0.0, r)] * (self.pruner.iterative_steps + 1)

    def _update_head_attributes(self) -> None:
        for layout in self.head_layouts:
            heads = self.pruner.num_heads.get(layout.projections[0])
            if heads is not None and heads >= 1 and (heads != layout.heads or layout.inner_width() % heads == 0):
                layout.update(heads)

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
        self._prune_checked(dg.get_pruning_group(attention.proj, tp.prune_linear_in_channels, idxs),
                            after=lambda: setattr(attention, "num_heads", keep))

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
               importance: tp.importance.Importance | None = None,
               kept_whole: Iterable[GroupFailure] = ()) -> PruningPlan:
    """Build the torch-pruning pruner for ``model`` (changed in place by ``PruningPlan.step``).

    ``ratio`` is the channel ratio reached after ``steps`` steps; ``layer_ratios`` gives some
    layers (by name) another one. With ``config.prune_heads`` self-attention modules are first
    swapped for head-prunable ones. ``kept_whole``: groups that failed before, kept whole by
    ignoring their root layer. Raises ``ModelError`` when torch-pruning cannot trace the model.
    """
    kept_whole = list(kept_whole)
    example = example.contiguous()
    one = example[:1]
    was_training = model.training
    model.eval()
    try:
        swapped = split_attention_heads(model, one) if config.prune_heads else []
        classifier = find_classifier(model, one)
        ignored_names = [classifier, *config.ignored_layers]
        ignored = _resolve_all(model, ignored_names, "ignored layer")
        ignored += _resolve_all(model, [f.root for f in kept_whole], "layer")
        attention = [m for m in model.modules() if isinstance(m, SplitHeadAttention)]
        # q/k/v widths change only by whole heads (PruningPlan._prune_heads), never channel by channel
        ignored += [m.qkv for m in attention]
        layouts = find_head_layouts(model)
        # fused q/k/v with its own output projection, or heads with per-head parameters: heads cut by
        # HeadLayout.drop_heads, the projections kept out of the graph's channel pruning (as
        # SplitHeadAttention's qkv)
        local = [layout for layout in layouts if layout.local]
        layouts = [layout for layout in layouts if layout not in local]
        # heads packed block by block in their projections (LeViT), proven by a trial
        local += find_packed_layouts(model, one) if config.prune_heads else []
        whole = {id(m) for m in _resolve_all(model, [f.root for f in kept_whole], "layer")}
        local = [layout for layout in local if id(layout.projections[0]) not in whole]
        ignored += [proj for layout in local for proj in layout.projections]
        num_heads = {proj: layout.heads for layout in layouts for proj in layout.projections}
        multiple = math.lcm(config.round_to or 1, _mha_head_multiple(model))
        names = list(layer_ratios or {})
        per_layer = dict(zip(_resolve_all(model, names, "layer"), (layer_ratios or {}).values(), strict=True))
        # a training-mode path with more outputs (an auxiliary head) is traced, so its layers are
        # cut with the rest; two samples: BatchNorm needs more than one value per channel in training
        train_path = len(example) > 1 and train_outputs_differ(model, example[:2])
        trace_input = example[:2] if train_path else one
        try:
            pruner = EdgePruner(
                model, trace_input,
                importance=importance or build_importance(config.importance),
                global_pruning=config.scope == "global",
                pruning_ratio=ratio,
                pruning_ratio_dict=per_layer or None,
                max_pruning_ratio=config.max_layer_ratio,
                iterative_steps=steps,
                round_to=multiple if multiple > 1 else None,
                ignored_layers=ignored,
                forward_fn=train_mode_forward if train_path else None,
                # fresh dicts: torch-pruning 1.6.1 mutates these default arguments across instances
                in_channel_groups={},
                out_channel_groups={},
                num_heads=num_heads,
                prune_num_heads=bool(layouts) and config.prune_heads,
                prune_head_dims=not (layouts and config.prune_heads),
                head_pruning_ratio=ratio if layouts and config.prune_heads else 0.0,
                head_pruning_ratio_dict={},
            )
        except Exception as exc:  # noqa: BLE001 - torch-pruning's tracer on user code
            raise ModelError(f"torch-pruning could not trace {type(model).__name__} to find its coupled layers: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                             hint="the model's forward must run on one example batch with plain tensor "
                                  "operations; remove the prune stage or choose another student") from exc
        _track_group_roots(pruner)
        probe = Probe.of(model, example[:2], check_train=train_path)
    finally:
        model.train(was_training)
    heads = {m: m.num_heads for m in attention} if config.prune_heads else {}
    layout_heads = {layout: layout.heads for layout in layouts} if config.prune_heads else {}
    plan = PruningPlan(model=model, pruner=pruner, config=config, ignored=ignored_names, probe=probe,
                       swapped_attention=swapped, initial_heads=heads, head_layouts=layouts,
                       layout_heads=layout_heads, failures=kept_whole, train_path=train_path,
                       fused_heads={layout: layout.heads for layout in local} if config.prune_heads else {})
    plan.reasons = _static_reasons(plan, classifier)
    return plan


def _track_group_roots(pruner: EdgePruner) -> None:
    """Remember the root layer of the group torch-pruning builds last, to name it if that fails."""
    build = pruner.DG.get_pruning_group

    def tracked(module, pruning_fn, idxs):
        pruner.last_root = module
        return build(module, pruning_fn, idxs)

    pruner.DG.get_pruning_group = tracked


def _static_reasons(plan: PruningPlan, classifier: str) -> dict[str, str]:
    """Why layers will keep their width, known before pruning: the classifier, the recipe's
    ignored layers, attention projections cut by whole heads, and every layer coupled to one
    of those or to a 1-channel output (a spatial gate broadcast over the features)."""
    model, dg = plan.model, plan.pruner.DG
    names = module_names(model)
    reasons: dict[str, str] = {classifier: "classifier (its outputs are the classes)"}
    for name in plan.config.ignored_layers:
        reasons[name] = "ignored by recipe (prune.ignored_layers)"
    for attention in plan.initial_heads:
        reasons[names[attention.qkv]] = "attention q/k/v projection: pruned by whole heads only"
    for layout in plan.fused_heads:
        if layout.heads == 1:
            for proj in layout.projections:
                reasons[names[proj]] = SINGLE_HEAD_REASON.format(name=layout.name.removeprefix("model."))
    for failure in plan.failures:
        for layer in failure.layers:
            reasons.setdefault(layer, failure.reason())
    direct = dict(reasons)
    for group in _all_groups(dg, plan.pruner.root_module_types):
        members = out_layers(group, names, dg)
        anchors = [m for m in members if m in direct]
        narrow = [names[d.target.module] for d, _ in group if dg.is_out_channel_pruning_fn(d.handler)
                  and isinstance(d.target.module, WIDTH_LAYERS) and dg.get_out_channels(d.target.module) == 1
                  and d.target.module in names]
        for member in members:
            if member in direct:
                continue
            if anchors:
                reasons[member] = f"coupled to {anchors[0]} ({direct[anchors[0]]})"
            elif narrow and member not in narrow:
                reasons[member] = (f"coupled to the 1-channel output of {narrow[0]} (a gate multiplied into "
                                   "these features): the group cannot lose channels")
            elif narrow:
                reasons[member] = "a single output channel"
    return reasons


def _all_groups(dg, root_types):
    """Every coupled group, whatever is ignored (a group torch-pruning cannot build is skipped)."""
    seen: set[nn.Module] = set()
    for module in list(dg.module2node):
        if module in seen or not isinstance(module, tuple(root_types)):
            continue
        pruner = dg.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        try:
            group = dg.get_pruning_group(module, pruner.prune_out_channels,
                                         list(range(pruner.get_out_channels(module))))
        except Exception:  # noqa: BLE001 - reported when the pruner itself reaches this group
            continue
        for dep, _ in group:
            if dg.is_out_channel_pruning_fn(dep.handler):
                seen.add(dep.target.module)
        yield group


def _is_output_head(plan: PruningPlan, module: nn.Module) -> bool:
    """A layer as wide as the classifier whose outputs no other traced layer reads (an auxiliary
    classifier): torch-pruning never cuts a model output."""
    node = plan.pruner.DG.module2node.get(module)
    if node is None:
        return False
    frontier, seen = list(node.outputs), set()
    while frontier:
        nxt = frontier.pop()
        if nxt in seen:
            continue
        seen.add(nxt)
        if isinstance(nxt.module, WIDTH_LAYERS):
            return False
        frontier.extend(nxt.outputs)
    return True


def kept_whole_rows(before: dict[str, dict], after: dict[str, dict], plan: PruningPlan,
                    ratio: float) -> list[dict[str, str | int]]:
    """Every prunable layer left at full width, or cut less than ``ratio`` asked, with the reason.

    Rows: ``{"layer", "before", "after", "reason"}``; a layer the reasons found before pruning
    does not cover is explained by rounding (``round_to``, channel groups) or ``max_layer_ratio``.
    """
    config, rows = plan.config, []
    modules = dict(plan.model.named_modules())
    multiple = config.round_to or 1
    for name, info in before.items():
        if name.endswith("#heads") or name not in after:
            continue
        old, new = int(info["width"]), int(after[name]["width"])
        asked = old * (1 - ratio)
        if ratio <= 0 or (new < old and new < asked + max(1.0, 0.5 * multiple)):
            continue  # cut as asked (within one rounding step); a layer left whole always gets its row
        reason = plan.reasons.get(name) or plan.reasons.get(name.removeprefix("model."))
        module = modules.get(name) or modules.get(f"model.{name}")
        if reason is None and new == old and module is not None and _is_output_head(plan, module):
            reason = "an output head (its outputs are the classes, like the classifier's)"
        if reason is None:
            groups = getattr(module, "groups", 1) if isinstance(module, nn.modules.conv._ConvNd) else 1
            if groups == getattr(module, "in_channels", 0) or groups == old:
                groups = 1  # depthwise: one channel per group, rounded like any layer
            if old == 1:
                reason = "a single output channel: nothing to cut"
            elif old < multiple:
                reason = f"round_to {multiple}: {old} channels is less than one multiple"
            elif old == multiple:
                reason = f"round_to {multiple}: {old} channels is already one multiple"
            elif groups > 1 and new != old:
                reason = (f"groups {groups} and round_to {multiple}: channels kept per group in multiples "
                          f"of lcm({groups}, {multiple}) / {groups}")
            elif new != old and old * (1 - config.max_layer_ratio) >= new - multiple:
                reason = f"max_layer_ratio {config.max_layer_ratio}"
            elif new != old:
                reason = f"round_to {multiple}: rounded to the nearest multiple"
            else:
                reason = "not pruned by torch-pruning (no coupled group was scored for it)"
        rows.append({"layer": name, "before": old, "after": new, "reason": reason})
    return rows


def missing_layers(model: nn.Module, names: Iterable[str]) -> list[str]:
    return [n for n in names if resolve_layer(model, n) is None]
