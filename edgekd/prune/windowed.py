"""Window attention (Swin and its kin): the residual stream keeps its width, by design.

A Swin block (Hugging Face ``SwinLayer``, timm's ``SwinTransformerBlock``: a module with
``window_size`` and ``shift_size``) views its tokens ``(B, H*W, C)`` as ``(B, H/w, w, W/w, w, C)``
windows and back. The channels stay on the last axis, but edgekd's reshape rule
(``edgekd.prune.graph_rules``) maps channels only through reshapes of at most 4 dimensions, the
rule torch-pruning 1.6.1 itself states, because a 5-D view is how a channel shuffle reorders
channels. So the residual stream (patch embedding, each block's attention output and MLP output
projections, patch merging) would reach an unmapped reshape and be reported as a failure. It is
declared kept whole up front instead, with that reason; the block's heads (``HeadLayout``) and
MLP hidden width are pruned as usual. This is the layout of torch-pruning's
examples/transformers/prune_hf_swin.py with the embedding dims left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from edgekd.prune.heads import find_head_layouts
from edgekd.prune.safety import GroupFailure, module_names

WINDOW_REASON = ("the residual stream of window attention ({block}) is kept at its width by design: its "
                 "forward views the tokens as 6-D windows, and channels are mapped only through reshapes of "
                 "at most 4 dimensions; its heads and MLP hidden width are pruned")


@dataclass
class KeptByDesign(GroupFailure):
    """A group edgekd keeps whole on purpose (not a torch-pruning failure): ``cause`` is the reason."""

    def reason(self) -> str:
        return self.cause


def _is_window_block(module: nn.Module) -> bool:
    return isinstance(getattr(module, "window_size", None), int) and hasattr(module, "shift_size")


def window_residuals(model: nn.Module) -> list[KeptByDesign]:
    """One ``KeptByDesign`` per Linear layer of a window block that writes the residual stream
    (its output width is the block's token width, read by the block's q/k/v; q/k/v themselves
    are cut by whole heads): as ``kept_whole``
    entries their roots are ignored and their groups (patch embedding, patch merging) explained."""
    names = module_names(model)
    kept: list[KeptByDesign] = []
    for block in model.modules():
        if not _is_window_block(block):
            continue
        layouts = [layout for layout in find_head_layouts(block) if layout.projections]
        if not layouts:
            continue
        width = layouts[0].projections[0].in_features
        heads = {proj for layout in layouts for proj in layout.projections}  # q/k/v: cut by whole heads
        reason = WINDOW_REASON.format(block=f"{names[block]} ({type(block).__name__})")
        for layer in block.modules():
            if isinstance(layer, nn.Linear) and layer.out_features == width and layer not in heads:
                kept.append(KeptByDesign(root=names[layer], layers=[names[layer]], operation="design",
                                         ops="", cause=reason))
    return kept
