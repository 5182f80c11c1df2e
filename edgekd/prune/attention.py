"""Head-prunable self-attention.

``nn.MultiheadAttention`` ties its inner width to ``embed_dim`` (the residual width), so a
whole head cannot be removed from it: torch-pruning can only shrink every head's dimension
together with the residual stream. Removing heads needs separate q/k/v projections whose
inner width is ``num_heads * head_dim``. ``SplitHeadAttention`` is that layout, numerically
identical to the module it replaces; ``edgekd.prune.pruner`` removes whole heads from it.

A pruned model that contains one is rebuilt by ``edgekd.models.portable`` from the original
architecture with ``SplitHeadAttention.from_module`` (the checkpoint names the swap).
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
    (their embedding width is still pruned, only not their head count).
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
    return swapped
