"""Head-prunable self-attention.

``nn.MultiheadAttention`` ties its inner width to ``embed_dim`` (the residual width), so a
whole head cannot be removed from it: torch-pruning can only shrink every head's dimension
together with the residual stream. Removing heads needs separate q/k/v projections whose
inner width is ``num_heads * head_dim``. ``SplitHeadAttention`` is that layout, numerically
identical to the module it replaces; ``edgekd.prune.pruner`` removes whole heads from it.

timm-style attention (one fused ``qkv`` Linear, heads by reshape, an output ``proj``) whose
forward reshapes the heads' output back to its *input* width (timm's ``reshape(B, N, C)``) cannot
lose a head: the reshape then fails. ``FusedHeadAttention`` is the same computation with the
output width taken from the heads (torch-pruning's examples/transformers/prune_timm_vit.py
replaces timm's forward the same way); it is swapped in only where a trial shows the module's own
forward cannot run with fewer heads, and only when it reproduces that module's output.

A pruned model that contains either is rebuilt by ``edgekd.models.portable`` from the original
architecture with the class's ``from_module`` (the checkpoint names the swap).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgekd.errors import ModelError


class SplitHeadAttention(nn.Module):
    """Drop-in for ``nn.MultiheadAttention`` used as self-attention: ``attn(x, x, x)[0]``.

    ``qkv`` projects to ``3 * num_heads * head_dim`` features laid out [q | k | v], each
    head-major (timm's ``Attention`` layout), which torch-pruning's dependency graph traces.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int | None = None, bias: bool = True,
                 batch_first: bool = False) -> None:
        super().__init__()
        head_dim = head_dim or embed_dim // num_heads
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.batch_first = batch_first
        self.qkv = nn.Linear(embed_dim, 3 * num_heads * head_dim, bias=bias)
        self.proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias)

    @classmethod
    def from_module(cls, mha: nn.Module) -> SplitHeadAttention:
        """Copy an ``nn.MultiheadAttention`` (packed q/k/v projection, no extra k/v bias)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise ModelError(f"cannot convert {type(mha).__name__} to SplitHeadAttention")
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ModelError("only nn.MultiheadAttention with packed q/k/v, no bias_k/bias_v and no "
                             "add_zero_attn can have heads pruned")
        new = cls(mha.embed_dim, mha.num_heads, mha.head_dim, bias=mha.in_proj_bias is not None,
                  batch_first=mha.batch_first)
        with torch.no_grad():
            new.qkv.weight.copy_(mha.in_proj_weight)
            new.proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                new.qkv.bias.copy_(mha.in_proj_bias)
                new.proj.bias.copy_(mha.out_proj.bias)
        return new.train(mha.training)

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None, *,
                need_weights: bool = False, attn_mask: Tensor | None = None,
                key_padding_mask: Tensor | None = None, is_causal: bool = False,
                average_attn_weights: bool = True) -> tuple[Tensor, None]:
        del average_attn_weights  # weights are never returned; accepted for call compatibility
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ModelError("SplitHeadAttention only computes self-attention (query, key and value the same)")
        if need_weights or attn_mask is not None or key_padding_mask is not None:
            raise ModelError("SplitHeadAttention does not support attention masks or returned weights")
        x = query if self.batch_first else query.transpose(0, 1)
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # unbind (not indexing): torch-pruning traces it as the q/k/v split
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        out = self.proj(out.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


class FusedHeadAttention(nn.Module):
    """timm's ``Attention`` whose output width follows its heads: ``(B, N, C) -> (B, N, C_out)``.

    ``qkv`` projects to ``3 * num_heads * head_dim`` features laid out [q | k | v], each head-major;
    ``proj`` reads ``num_heads * head_dim`` features. Where timm reshapes the heads' output to the
    input width ``C`` (which fails once a head is gone), this reshapes to ``num_heads * head_dim``;
    ``unbind`` (not indexing) splits q/k/v so torch-pruning's graph traces the split. ``scale``
    multiplies q (timm: ``head_dim ** -0.5``; it does not change when whole heads are removed).
    ``q_norm``, ``k_norm``, ``attn_drop``, ``proj_drop`` are the original module's (Identity if absent).
    """

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, scale: float | None = None,
                 q_norm: nn.Module | None = None, k_norm: nn.Module | None = None,
                 attn_drop: nn.Module | None = None, proj_drop: nn.Module | None = None) -> None:
        super().__init__()
        if num_heads < 1 or qkv.out_features % (3 * num_heads) or proj.in_features * 3 != qkv.out_features:
            raise ModelError(f"a fused qkv Linear with {qkv.out_features} outputs and an output projection "
                             f"reading {proj.in_features} features do not make {num_heads} attention heads")
        self.num_heads = num_heads
        self.head_dim = qkv.out_features // (3 * num_heads)
        self.scale = float(scale) if scale is not None else self.head_dim ** -0.5
        self.qkv = qkv
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()
        self.attn_drop = attn_drop if attn_drop is not None else nn.Identity()
        self.proj = proj
        self.proj_drop = proj_drop if proj_drop is not None else nn.Identity()

    @classmethod
    def from_module(cls, module: nn.Module, qkv: nn.Module | None = None,
                    proj: nn.Module | None = None) -> FusedHeadAttention:
        """Take over a timm-style module's fused qkv and output Linear layers (shared, not copied; by
        default its ``qkv``/``proj``, or the ones given, found by ``find_head_layouts`` under other names
        such as ``to_qkv``/``out``), its head count (``num_heads`` or kin), ``scale`` and optional
        norms/dropouts. ``ModelError`` when the module lacks them."""
        from edgekd.prune.heads import HEAD_COUNT_ATTRS  # heads imports this module

        qkv = qkv if qkv is not None else module._modules.get("qkv")
        proj = proj if proj is not None else module._modules.get("proj")
        heads = next((v for a in HEAD_COUNT_ATTRS if isinstance(v := module.__dict__.get(a), int)
                      and not isinstance(v, bool)), None)
        if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear) or heads is None:
            raise ModelError(f"cannot convert {type(module).__name__} to FusedHeadAttention: it needs qkv and "
                             "proj Linear layers and an integer head count (num_heads)")
        scale = module.__dict__.get("scale")
        extra = {n: m for n in ("q_norm", "k_norm", "attn_drop", "proj_drop")
                 if isinstance(m := module._modules.get(n), nn.Module)}
        new = cls(qkv, proj, heads, scale if isinstance(scale, float) else None, **extra)
        return new.train(module.training)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(out))


def _self_attention_calls(model: nn.Module, example: Tensor) -> set[str]:
    """Names of the ``nn.MultiheadAttention`` modules that the example forward calls as plain
    self-attention (same tensor for q/k/v, no masks): only those can be swapped safely."""
    names = {module: name for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)}
    plain: set[str] = set()
    mixed: set[str] = set()

    def hook(module, args, kwargs):
        q, k, v = (list(args) + [kwargs.get("query"), kwargs.get("key"), kwargs.get("value")])[:3]
        masks = [kwargs.get(n) for n in ("attn_mask", "key_padding_mask")] + list(args[4:6])
        ok = q is not None and k is q and v is q and all(m is None for m in masks)
        (plain if ok else mixed).add(names[module])

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in names]
    try:
        was_training = model.training
        with torch.no_grad():
            model.eval()(example)
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return plain - mixed


def split_attention_heads(model: nn.Module, example: Tensor) -> list[str]:
    """Replace each self-attention ``nn.MultiheadAttention`` by an equal ``SplitHeadAttention``.

    Returns the names replaced. Modules used for cross-attention or with masks stay as they are
    (their embedding width is still pruned, only not their head count). timm-style fused attention
    that cannot run with fewer heads is swapped for ``FusedHeadAttention`` too
    (``edgekd.prune.heads.swap_fused_attention``).
    """
    swapped = []
    for name in sorted(_self_attention_calls(model, example)):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        mha = getattr(parent, attr)
        try:
            setattr(parent, attr, SplitHeadAttention.from_module(mha))
        except ModelError:
            continue
        swapped.append(name)
    from edgekd.prune.heads import swap_fused_attention  # heads imports this module

    return swapped + swap_fused_attention(model, example)
