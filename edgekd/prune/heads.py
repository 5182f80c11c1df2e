"""Attention modules that keep their head layout in attributes (Hugging Face, timm, hand-written).

Such a module projects to ``num_heads * head_dim`` features with separate q/k/v Linear layers
(Hugging Face ``ViTSelfAttention``: ``query``/``key``/``value``, ``num_attention_heads``,
``attention_head_size``, ``all_head_size``) or one fused ``qkv`` Linear (timm ``Attention``:
``num_heads``, ``head_dim``), and its forward reshapes by those attributes. torch-pruning removes
whole heads from the projections when told each projection's head count (its ``num_heads``
argument with ``prune_num_heads``, as in torch-pruning's examples/transformers/prune_hf_vit.py);
the module's attributes must then be set to the new layout, or its reshape fails
("shape '[2, -1, 4, 16]' is invalid").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from edgekd.errors import ModelError
from edgekd.prune.attention import FusedHeadAttention, SplitHeadAttention

#: attribute names that hold a head count, most specific first
HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
#: attribute names that hold the width of one head
HEAD_DIM_ATTRS = ("attention_head_size", "head_dim", "head_size", "d_head")
#: separate projections, by the names libraries give them
SEPARATE_QKV = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"))
FUSED_QKV = ("qkv", "in_proj", "c_attn", "to_qkv", "qkv_proj", "Wqkv")
#: the output projection of a fused-qkv module, by the names libraries and hand-written code give it
#: (``out`` and ``to_out`` in many hand-written attentions: a user's ``qkv``/``out`` module was refused)
OUT_PROJ = ("proj", "out_proj", "o_proj", "c_proj", "dense", "out", "to_out", "out_linear")


@dataclass(eq=False)
class HeadLayout:
    """One attention module whose heads torch-pruning may remove.

    ``projections`` are the Linear layers whose outputs are laid out head-major: three
    (q, k, v) or one fused layer with ``3 * heads * head_dim`` outputs. ``out_proj`` reads all
    heads (fused layouts: the module's own; separate q/k/v: the output projection beside the
    module, Hugging Face's ``attention.output.dense``). ``head_params``: the module's own
    parameters with one axis per head, as (name, axis) (Swin's ``relative_position_bias_table``).
    """

    name: str
    module: nn.Module
    count_attr: str
    projections: tuple[nn.Linear, ...]
    out_proj: nn.Linear | None = None
    head_params: tuple[tuple[str, int], ...] = ()

    @property
    def heads(self) -> int:
        return int(getattr(self.module, self.count_attr))

    @property
    def fused(self) -> bool:
        return len(self.projections) == 1

    @property
    def local(self) -> bool:
        """Heads cut by ``drop_heads`` rather than torch-pruning's graph: fused q/k/v taken by
        indexing (torch-pruning's scoring raises IndexError on it), and modules with per-head
        parameters (torch-pruning prunes an unwrapped parameter's last axis channel by channel,
        not head by head: Swin's bias table of 2 heads was cut with channel indices)."""
        return self.out_proj is not None and (self.fused or bool(self.head_params))

    def inner_width(self) -> int:
        """Features of one of q, k or v: ``heads * head_dim``."""
        out = self.projections[0].out_features
        return out // 3 if self.fused else out

    def head_dim(self) -> int:
        return self.inner_width() // self.heads

    def drop_heads(self, keep: int) -> list[int]:
        """Remove the heads with the smallest L2 weight (their q/k/v rows, their columns of the
        output projection, their entries of per-head parameters) with torch-pruning's pruning
        functions, until ``keep`` remain; update the attributes. Returns the heads removed.

        Used where torch-pruning's graph cannot follow the layout (see ``local``)."""
        import torch
        import torch_pruning as tp

        assert self.out_proj is not None
        heads, dim, inner = self.heads, self.head_dim(), self.inner_width()
        if keep >= heads:
            return []
        proj = self.out_proj
        with torch.no_grad():
            rows = sum(p.weight.view(-1, heads, dim, p.in_features).pow(2).sum((0, 2, 3)) for p in self.projections)
            cols = proj.weight.view(proj.out_features, heads, dim).pow(2).sum((0, 2))
        drop = sorted(torch.argsort(rows + cols)[: heads - keep].tolist())
        per_head = [h * dim + d for h in drop for d in range(dim)]
        if self.fused:
            tp.prune_linear_out_channels(self.projections[0], [part * inner + i for part in range(3) for i in per_head])
        else:
            for layer in self.projections:
                tp.prune_linear_out_channels(layer, per_head)
        tp.prune_linear_in_channels(proj, per_head)
        keep_head_params(self.module, self.head_params, [h for h in range(heads) if h not in drop])
        self.update(keep)
        return drop

    def update(self, heads: int) -> None:
        """Set the module's head attributes to ``heads`` heads of the projections' current width."""
        module, inner = self.module, self.inner_width()
        setattr(module, self.count_attr, heads)
        for attr in HEAD_DIM_ATTRS:
            if isinstance(module.__dict__.get(attr), int):
                setattr(module, attr, inner // heads)
        if isinstance(module.__dict__.get("all_head_size"), int):
            module.all_head_size = inner


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    child = module._modules.get(name)
    return child if isinstance(child, nn.Linear) else None


def _head_params(module: nn.Module, heads: int) -> tuple[tuple[str, int], ...]:
    """The module's own parameters with exactly one axis of length ``heads`` (none when a
    parameter has several: which is the head axis would be a guess)."""
    found = []
    for name, param in module._parameters.items():
        axes = [i for i, size in enumerate(param.shape) if size == heads] if param is not None and heads > 1 else []
        if len(axes) == 1:
            found.append((name, axes[0]))
    return tuple(found)


def _out_projection(model: nn.Module, name: str, module: nn.Module, inner: int,
                    projections: tuple[nn.Linear, ...]) -> nn.Linear | None:
    """The one Linear beside an attention module (under its parent, e.g. Hugging Face's
    ``attention.output.dense``) that reads ``inner`` features; None when there is not exactly one."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if name else None
    if parent is None:
        return None
    inside = set(module.modules())
    found = [m for m in parent.modules() if isinstance(m, nn.Linear) and m not in inside
             and m.in_features == inner and m not in projections]
    return found[0] if len(found) == 1 else None


def find_head_layouts(model: nn.Module) -> list[HeadLayout]:
    """Every attention module (other than ``nn.MultiheadAttention`` and edgekd's own
    ``SplitHeadAttention``, pruned elsewhere) with an integer head count attribute and q/k/v or
    fused qkv Linear children whose widths fit that head count."""
    found: list[HeadLayout] = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.MultiheadAttention, SplitHeadAttention)):
            continue
        count_attr = next((a for a in HEAD_COUNT_ATTRS if isinstance(module.__dict__.get(a), int)
                           and not isinstance(module.__dict__.get(a), bool)), None)
        if count_attr is None:
            continue
        heads = module.__dict__[count_attr]
        if heads < 1:
            continue
        for names in SEPARATE_QKV:
            layers = [_linear(module, n) for n in names]
            if all(layers) and len({lin.out_features for lin in layers}) == 1 and layers[0].out_features % heads == 0:
                projections = tuple(layers)
                out = _out_projection(model, name, module, layers[0].out_features, projections)  # type: ignore[arg-type]
                found.append(HeadLayout(name, module, count_attr, projections, out,  # type: ignore[arg-type]
                                        _head_params(module, heads) if out is not None else ()))
                break
        else:
            for fused_name in FUSED_QKV:
                fused = _linear(module, fused_name)
                if fused is not None and fused.out_features % (3 * heads) == 0:
                    out = next((lin for n in OUT_PROJ if (lin := _linear(module, n)) is not None
                                and lin.in_features == fused.out_features // 3), None)
                    found.append(HeadLayout(name, module, count_attr, (fused,), out, _head_params(module, heads)))
                    break
    return found


def _calls(model: nn.Module, modules: dict[nn.Module, str], example: torch.Tensor) -> dict[nn.Module, tuple]:
    """(input, output) of each of ``modules`` in one eval-mode forward of ``example``, for modules
    called once with one tensor (other arguments None) that return a tensor; others are left out."""
    seen: dict[nn.Module, list] = {m: [] for m in modules}

    def hook(module, args, kwargs, output):
        plain = len(args) == 1 and isinstance(args[0], torch.Tensor) and all(v is None for v in kwargs.values())
        seen[module].append((args[0], output) if plain and isinstance(output, torch.Tensor) else None)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return {m: calls[0] for m, calls in seen.items() if len(calls) == 1 and calls[0] is not None}


def _runs_with_one_head_less(module: nn.Module, x: torch.Tensor, shape: torch.Size) -> bool:
    """A copy of ``module`` with its least important head removed still maps ``x`` to ``shape``."""
    trial = copy.deepcopy(module)
    layout = next((lay for lay in find_head_layouts(trial) if lay.module is trial), None)
    if layout is None or layout.out_proj is None:
        return False
    layout.drop_heads(layout.heads - 1)
    try:
        with torch.no_grad():
            out = trial(x)
    except Exception:  # noqa: BLE001 - the user's forward failing is the answer
        return False
    return isinstance(out, torch.Tensor) and out.shape == shape


def swap_fused_attention(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Swap timm-style fused-qkv attention that cannot lose a head for ``FusedHeadAttention``.

    A module is swapped when its own forward, with one head removed, fails or changes its output
    shape (timm reshapes the heads' output to the input width), and ``FusedHeadAttention`` built
    from it gives the same output (eval mode, ``example``) and runs with a head removed. Others are
    left alone: their heads are cut in place (``HeadLayout.drop_heads``) or, where that breaks the
    forward, kept whole with the cause. Returns the names swapped; ``model`` is in eval mode here.
    """
    layouts = {layout.module: layout for layout in find_head_layouts(model)
               if layout.fused and not layout.head_params and layout.out_proj is not None and layout.heads > 1
               and any(child is layout.out_proj for child in layout.module.children())}
    names = {module: layout.name for module, layout in layouts.items()}
    if not names:
        return []
    swapped = []
    for module, (x, y) in _calls(model, names, example).items():
        if _runs_with_one_head_less(module, x, y.shape):
            continue
        try:
            new = FusedHeadAttention.from_module(module, layouts[module].projections[0], layouts[module].out_proj)
        except ModelError:
            continue
        with torch.no_grad():
            same = torch.allclose(new(x), y, rtol=1e-4, atol=1e-5 * max(1.0, float(y.abs().max())))
        if not same or not _runs_with_one_head_less(new, x, y.shape):
            continue
        name = names[module]
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
        swapped.append(name)
    return sorted(swapped)


def keep_head_params(module: nn.Module, head_params, kept: list[int]) -> None:
    """Replace each per-head parameter of ``module`` (``(name, head axis)`` pairs, e.g. a relative
    position bias table's head columns) by its slices for the ``kept`` heads, as new Parameters."""
    for name, axis in head_params:
        param = getattr(module, name)
        with torch.no_grad():
            part = param.index_select(axis, torch.tensor(kept, device=param.device)).clone()
        setattr(module, name, nn.Parameter(part, requires_grad=param.requires_grad))
