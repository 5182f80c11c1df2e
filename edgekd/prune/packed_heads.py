"""Attention whose projections pack each head's features together (Hugging Face / timm LeViT).

LeViT's ``LevitAttention`` projects with one Linear + BatchNorm (``MLPLayerWithBN``) to
``heads * (key_dim + key_dim + attention_ratio * key_dim)`` features and takes the heads by
``view(B, N, heads, -1).split([key_dim, key_dim, d_v], dim=3)``: head ``h`` owns the block
``[h * w, (h + 1) * w)`` of the output, q, k and v inside it (``LevitAttentionSubsample`` does the
same with a k/v projection and a queries projection). Its output projection reads ``heads * d_v``
features, head-major; ``attention_biases`` has one row per head; ``out_dim_keys_values`` and
``out_dim_projection`` are widths its forward reshapes by. torch-pruning's graph follows none of
that (its scoring raised ``IndexError`` on the view + split), so whole heads are removed here, the
way ``HeadLayout.drop_heads`` removes fused q/k/v heads: each projection's block of rows (and the
BatchNorm after it), the output projection's columns, the per-head rows of the module's
parameters; widths the forward reshapes by are scaled; caches of per-head tensors are emptied.

Nothing here is specific to LeViT's names: a module with a head count attribute whose Linear
layers (all but the last one run) have widths divisible by the head count is a candidate, and
it is used only when a trial proves the layout: with one head removed, the module must give the
same output as the original with that head's columns of the output projection set to zero (the
exact effect of removing a head, whatever the attention computes inside it). A module with one
head keeps it: its projections are kept whole by design (a head is the unit removed).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from edgekd.prune.attention import SplitHeadAttention
from edgekd.prune.heads import HEAD_COUNT_ATTRS, HeadLayout, _calls, find_head_layouts, keep_head_params

#: norms that follow a projection inside its wrapper (LeViT's MLPLayerWithBN), pruned with its rows
_NORMS = {nn.BatchNorm1d: tp.prune_batchnorm_out_channels, nn.LayerNorm: tp.prune_layernorm_out_channels}

SINGLE_HEAD_REASON = ("attention {name} has a single head: its q/k/v projections keep their width by design "
                      "(whole heads are the unit pruned, and one head must stay)")


@dataclass(eq=False)
class PackedHeadLayout(HeadLayout):
    """An attention module whose projections are laid out head by head (see the module docstring).

    ``norms``: (projection, norm after it) pairs; ``width_attrs``: the module's integer attributes
    that hold a projection width (scaled with the heads); ``head_params`` as ``HeadLayout``'s."""

    norms: tuple[tuple[nn.Linear, nn.Module], ...] = ()
    width_attrs: tuple[str, ...] = ()

    @property
    def fused(self) -> bool:
        return False

    @property
    def local(self) -> bool:
        return True

    def inner_width(self) -> int:
        assert self.out_proj is not None
        return self.out_proj.in_features

    def head_scores(self) -> torch.Tensor:
        """L2 of each head's rows of every projection and columns of the output projection."""
        heads, proj = self.heads, self.out_proj
        assert proj is not None
        with torch.no_grad():
            rows = sum(p.weight.view(heads, -1).pow(2).sum(1) for p in self.projections)
            cols = proj.weight.view(proj.out_features, heads, -1).pow(2).sum((0, 2))
        return rows + cols

    def drop_heads(self, keep: int) -> list[int]:
        """Remove the heads with the smallest L2 weight until ``keep`` remain (see ``remove``)."""
        heads = self.heads
        if keep >= heads:
            return []
        drop = sorted(torch.argsort(self.head_scores())[: heads - keep].tolist())
        self.remove(drop)
        return drop

    def remove(self, drop: list[int]) -> None:
        """Remove the heads ``drop`` (indices) with torch-pruning's pruning functions."""
        heads, proj = self.heads, self.out_proj
        assert proj is not None
        norms = dict(self.norms)
        old_widths = {p: p.out_features for p in self.projections}
        for layer in self.projections:
            block = layer.out_features // heads
            idxs = [h * block + d for h in drop for d in range(block)]
            tp.prune_linear_out_channels(layer, idxs)
            norm = norms.get(layer)
            if norm is not None:
                _NORMS[type(norm)](norm, idxs)
        block = proj.in_features // heads
        tp.prune_linear_in_channels(proj, [h * block + d for h in drop for d in range(block)])
        kept = [h for h in range(heads) if h not in drop]
        keep_head_params(self.module, self.head_params, kept)
        new_widths = {old: p.out_features for p, old in old_widths.items()}
        new_widths[proj.in_features * heads // len(kept)] = proj.in_features
        for attr in self.width_attrs:
            setattr(self.module, attr, new_widths[getattr(self.module, attr)])
        for attr, value in list(self.module.__dict__.items()):
            if "cache" in attr and isinstance(value, dict):  # LeViT's attention_bias_cache: per-head biases
                setattr(self.module, attr, {})
        setattr(self.module, self.count_attr, len(kept))

    def update(self, heads: int) -> None:  # the head count is set by ``remove``
        setattr(self.module, self.count_attr, heads)


def _linear_calls(module: nn.Module, x: torch.Tensor) -> list[nn.Linear]:
    """The Linear layers of ``module`` in the order one eval forward of ``x`` runs them (each once)."""
    order: list[nn.Linear] = []
    handles = [m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
               for m in module.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for handle in handles:
            handle.remove()
    return order if len(set(order)) == len(order) else []


def _norm_after(module: nn.Module, layer: nn.Linear) -> nn.Module | None:
    """The one norm beside ``layer`` in its wrapper (not the attention module itself) with its width."""
    for parent in module.modules():
        if parent is module or layer not in parent._modules.values():
            continue
        norms = [m for m in parent._modules.values() if type(m) in _NORMS
                 and (getattr(m, "num_features", None) == layer.out_features
                      or tuple(getattr(m, "normalized_shape", ())) == (layer.out_features,))]
        return norms[0] if len(norms) == 1 else None
    return None


def _candidate(name: str, module: nn.Module, count_attr: str, x: torch.Tensor) -> list[PackedHeadLayout]:
    """The layouts ``module`` could have (one per choice of head axis of its per-head parameters)."""
    heads = int(module.__dict__[count_attr])
    order = _linear_calls(module, x)
    if len(order) < 2:
        return []
    *projections, out = order
    if out.in_features % heads or any(p.out_features % heads for p in projections):
        return []
    widths = {p.out_features for p in projections} | {out.in_features}
    width_attrs = tuple(a for a, v in module.__dict__.items() if a != count_attr and type(v) is int and v in widths)
    norms = tuple((p, n) for p in projections if (n := _norm_after(module, p)) is not None)
    axes = [[(n, i) for i, size in enumerate(p.shape) if size == heads] for n, p in module._parameters.items()
            if p is not None and heads in p.shape]
    return [PackedHeadLayout(name, module, count_attr, tuple(projections), out, tuple(choice), norms, width_attrs)
            for choice in itertools.product(*axes)]


def _proves(layout: PackedHeadLayout, x: torch.Tensor) -> bool:
    """Removing head 0 gives what zeroing its columns of the output projection gives."""
    module = layout.module
    reference = copy.deepcopy(module)
    memo: dict = {}
    trial_module = copy.deepcopy(module, memo)
    reference.eval()  # not chained: LeViT's train() override returns None
    trial_module.eval()
    trial = copy.deepcopy(layout, memo)  # the same layout on the copy (the memo maps its layers)
    ref_proj = dict(zip(module.modules(), reference.modules(), strict=True))[layout.out_proj]
    block = ref_proj.in_features // layout.heads
    try:
        with torch.no_grad():
            ref_proj.weight[:, :block] = 0
            expected = reference(x)
            trial.remove([0])
            got = trial_module(x)
    except Exception:  # noqa: BLE001 - a wrong layout breaks the user's forward: not this one
        return False
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return False
    scale = max(1.0, float(expected.abs().max()))
    return bool(torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * scale))


def find_packed_layouts(model: nn.Module, example: torch.Tensor) -> list[PackedHeadLayout]:
    """Attention modules (not found by ``find_head_layouts``) whose heads are packed blocks of their
    projections, each proven by a trial (module docstring); single-head modules are returned too
    (their projections are kept whole). ``model`` is run in eval mode on ``example``."""
    known = {layout.module for layout in find_head_layouts(model)}
    candidates: dict[nn.Module, tuple[str, str]] = {}
    for name, module in model.named_modules():
        if module in known or isinstance(module, (nn.MultiheadAttention, SplitHeadAttention)):
            continue
        count_attr = next((a for a in HEAD_COUNT_ATTRS if type(module.__dict__.get(a)) is int), None)
        if count_attr is not None and module.__dict__[count_attr] >= 1:
            candidates[module] = (name, count_attr)
    if not candidates:
        return []
    was_training = model.training
    model.eval()
    try:
        calls = _calls(model, dict(candidates), example)
    finally:
        model.train(was_training)
    found = []
    for module, (x, _y) in calls.items():
        name, count_attr = candidates[module]
        for layout in _candidate(name, module, count_attr, x):
            if layout.heads == 1 or _proves(layout, x):
                found.append(layout)
                break
    return found
