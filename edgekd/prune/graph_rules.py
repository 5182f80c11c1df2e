"""Where torch-pruning's index mapping needs a hint: chunk gates and channel shuffles.

- **Chunk gates** (``a, b = self.expand(x).chunk(2, dim=1); y = a * torch.sigmoid(b)``, GLU-style):
  output channel ``j`` of ``expand`` is multiplied with channel ``j + C/2``, so the two halves must
  lose the same positions. torch-pruning does this when told the layer's output comes in
  ``k`` channel groups (``out_channel_groups={expand: 2}``): it averages the halves' scores and
  removes each chosen position from every half. ``chunk_gates`` finds such layers on the traced
  graph: a channel split into equal parts whose parts meet again at one element-wise op.
- **Channel shuffle** (``x.view(b, g, c // g, h, w)``, ``transpose(1, 2)``, ``view(b, -1, h, w)``,
  torchvision's ShuffleNetV2): torch-pruning 1.6.1 maps channels only through reshapes of 1-D and
  4-D tensors, a rule it reads from ``grad_fn._saved_self_sizes``; torch 2 names that
  ``_saved_self_sym_sizes``, so the rule never applies and the 5-D view of a shuffle reached a
  division by zero (``ZeroDivisionError`` while building the graph, reported on ShuffleNetV2) or
  an identity mapping that is wrong for a permutation. ``reshape_rule`` restores the rule while
  the graph and its groups are built; a group stops at a reshape left unmapped and is kept whole
  (``EdgePruner.estimate_importance``), the rest of the model is pruned.
  A shuffle between a conv and the convs reading it (ShuffleNetV1: grouped 1x1, shuffle,
  depthwise, grouped 1x1) is mapped instead, as the permutation it is (``map_shuffle``): the
  units pruned together are the channels at the same position of every group on both sides
  (union-find over both groupings, ``_shuffle_units``), given to torch-pruning as the feeding
  conv's ``out_channel_groups``; the group is rooted at that conv (its order is the units').
- **Broadcast gates** (``y * torch.sigmoid(self.gate(y))`` with a 1-channel gate, CBAM's
  spatial attention): torch-pruning couples every input of an element-wise op channel by
  channel, so the features' channels were tied to the gate's single channel and the group could
  not lose any. A 1-channel input broadcast over C > 1 channels constrains none of them:
  ``cut_broadcast_inputs`` stops index propagation on that edge (both directions), so the
  features are pruned as usual and the gate keeps its one channel (its input channels follow
  the features).
- **Split outputs in order** (``part, rest = torch.split(x, [8, 24], 1)`` where ``rest`` is used
  first in the traced graph): torch-pruning gives the i-th section's offsets to the i-th output
  node *in the order the graph was walked*, so ``self.conv(part)`` got ``rest``'s 24 channels
  (``IndexError: index 8 is out of bounds for dimension 0 with size 8`` while scoring).
  ``order_split_outputs`` sorts each split's output nodes by the section they read (the
  ``output_nr`` of their autograd edge) before any index mapping is built.
- **Split sizes fixed in the code** (``torch.split(x, self.sizes, 1)``, FasterNet's partial
  convolution): the sizes are numbers the forward passes again after pruning, so the width of
  the split tensor cannot change. Such a split (``torch.split``/``Tensor.split``, not ``chunk``,
  on the channel axis) is a stop like an unmapped reshape: the groups reaching it keep their
  width with that reason, everything else is pruned (``stop_fixed_splits``).
- **Flatten into a concatenation** (``cat([pool(a).flatten(1), pool(b).flatten(1)])`` into a
  classifier): torch-pruning infers a flatten's stride as (channels after) // (channels before),
  and after a concatenation "channels after" is the whole concatenation (16 -> 48 read as a
  stride of 3), so pruning one branch cut the wrong columns of the classifier. Its own check
  (C*H*W must equal the channels after, else no mapping) reads ``_saved_self_sizes`` too; here
  a 4-D input's stride is its H*W (``_fix_flatten``): 1 after global pooling (channels map one
  to one, and the concatenation's offsets place them in the classifier's input).
- **Channels last** (``x.view(b, h, w, c)[:, ::2, ::2].reshape(b, -1, c)``, LeViT's subsampled
  queries; token tensors ``(B, N, C)`` viewed as maps): torch-pruning takes axis 1 of every 4-D
  tensor as the channel axis, so the spatial stride-2 slice on axis 1 was mapped as a slice of
  channels (16 pruned channels reached the next Linear as 8) and a flatten was read as
  channels-first. A 4-D tensor whose last axis has the channel count (and axis 1 another size)
  is channels-last (``_channels_last``): a slice of another axis maps channels one to one, a
  reshape that keeps the last axis at the channel count maps them one to one, and one that
  flattens positions and channels together puts channel ``c`` at ``p * C + c``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping, shape_infer

_OP = tp.ops.OPTYPE
#: node types a channel passes through unchanged (the walk from a layer to a split and on to the join)
_CHANNELWISE = {_OP.BN, _OP.ELEMENTWISE, _OP.LN, _OP.GN, _OP.IN, _OP.PRELU}
#: how far the walks look (nodes)
_MAX_WALK = 8


def _input_sizes(node) -> tuple[int, ...] | None:
    grad_fn = node.grad_fn
    for attr in ("_saved_self_sym_sizes", "_saved_self_sizes"):
        sizes = getattr(grad_fn, attr, None)
        if sizes is not None:
            try:
                return tuple(int(s) for s in sizes)
            except (TypeError, ValueError):
                return None
    return None


class _Unmapped:
    """The index mapping of every edge at a reshape torch-pruning cannot map: no channel crosses it
    (the group stops there) and the reshape is noted as reached, so the group is kept whole."""

    def __init__(self, node, state: ReshapeState, then=None) -> None:
        self.node, self.state, self.then = node, state, then

    def __call__(self, idxs):
        if self.then is not None:  # a concatenation's offsets first: only the indices that reach this edge
            idxs = self.then(idxs)
        if len(idxs):
            self.state.reached.add(self.node)
        return []


#: why a group stops at a reshape of more than 4 dimensions that is not a channel shuffle
RESHAPE_REASON = "torch-pruning cannot follow a reshape of more than 4 dimensions through these channels"
SHUFFLE_REASON = RESHAPE_REASON
#: a channel shuffle's streams keep their width (its groups would have to lose the same positions
#: in every shuffled group, which torch-pruning's index mapping cannot express through the 5-D view)
SHUFFLE_DESIGN = ("a channel shuffle (view to 5-D, transpose, view back) interleaves these channels across "
                  "its groups: the layers whose channels pass through it keep their width (channels are not "
                  "mapped through the 5-D view), the others are pruned")


def _is_channel_shuffle(node) -> bool:
    """``x.view(b, g, c // g, h, w).transpose(1, 2)[.contiguous()].view(b, -1, h, w)``: this node is the
    view back, fed (through transpose/permute and copies) by a view of a 4-D tensor."""
    sizes = _input_sizes(node)
    if sizes is None or len(sizes) != 5:
        return False
    current, transposed = node, False
    for _ in range(4):
        if len(current.inputs) != 1:
            return False
        current = current.inputs[0]
        name = current.grad_fn.name() if hasattr(current.grad_fn, "name") else ""
        if current.type == _OP.RESHAPE:
            before = _input_sizes(current)
            return transposed and before is not None and len(before) == 4
        if "Transpose" in name or "Permute" in name:
            transposed = True
        elif current.type != _OP.ELEMENTWISE:
            return False
    return False


class ReshapeState:
    """Per dependency graph: the nodes no channel index crosses (reshapes left unmapped, splits
    with sizes fixed in the code), why, and those the group being built reached."""

    def __init__(self) -> None:
        self.unmapped: set = set()
        self.reached: set = set()
        self.why: dict = {}  # node -> why no index crosses it
        self.by_design: set = set()  # nodes that keep their groups whole by design (not a failure)
        self.shuffle_groups: dict = {}  # layer feeding a mapped channel shuffle -> its out_channel_groups
        self.layouts: dict = {}  # reshape/slice node -> how channels-last channels cross it (decided once)

    def stop_at(self, node, why: str = SHUFFLE_REASON, by_design: bool = False) -> None:
        if node in self.unmapped:
            return
        self.unmapped.add(node)
        self.why[node] = why
        if by_design:
            self.by_design.add(node)
        self.restop(node)

    def restop(self, node) -> None:
        """(Re)install the stop on every edge of ``node`` (torch-pruning rewrites split edges each update)."""
        for dep in _reshape_edges(node):
            first, then = dep.index_mapping
            if isinstance(first, _Unmapped) and then is None:
                continue  # installed, and no new concatenation mapping since
            dep.index_mapping[0], dep.index_mapping[1] = _Unmapped(node, self, then), None


@contextmanager
def reshape_rule(state: ReshapeState) -> Iterator[ReshapeState]:
    """While torch-pruning builds a dependency graph or a group: a reshape whose input has more
    than 4 dimensions is not index-mapped (torch-pruning's own rule, see the module docstring), and
    a reshape whose channels cannot be inferred (``ZeroDivisionError``) is left unmapped instead of
    failing the whole graph. Groups stop at such a reshape; ``state`` records them."""
    original = index_mapping.update_reshape_index_mapping

    def guarded(graph, node) -> None:
        if node.type != _OP.RESHAPE or node in state.unmapped:
            return None if node in state.unmapped else original(graph, node)
        sizes = _input_sizes(node)
        if sizes is not None and len(sizes) > 4:
            if _is_channel_shuffle(node):
                if not map_shuffle(graph, node, state):
                    state.stop_at(node, SHUFFLE_DESIGN, by_design=True)
            elif channels_last_layout(graph, node, state) == _ONE_TO_ONE:
                _one_to_one(node)  # Swin's windows: (B, H/w, w, W/w, w, C) back to tokens, C kept last
            else:
                state.stop_at(node, RESHAPE_REASON)
            return None
        try:
            original(graph, node)
        except ZeroDivisionError:
            state.stop_at(node)
            return None
        if sizes is not None and len(sizes) == 4:
            layout = channels_last_layout(graph, node, state)
            if layout is not None:
                _fix_channels_last_reshape(graph, node, layout)
            else:
                _fix_flatten(node, sizes[2] * sizes[3])
        return None

    update_all = index_mapping.update_index_mapping

    def update_ordered(graph) -> None:
        order_split_outputs(graph)
        update_all(graph)
        fix_channels_last_slices(graph, state)
        for node in state.unmapped:
            state.restop(node)

    index_mapping.update_reshape_index_mapping = guarded
    index_mapping.update_index_mapping = update_ordered
    try:
        yield state
    finally:
        index_mapping.update_reshape_index_mapping = original
        index_mapping.update_index_mapping = update_all


def _section_of(consumer, split) -> int | None:
    """Which output of ``split``'s autograd node ``consumer`` reads (its edge's ``output_nr``)."""
    grad_fn = getattr(consumer, "grad_fn", None)
    found = [nr for fn, nr in getattr(grad_fn, "next_functions", ()) if fn is not None and fn is split.grad_fn]
    return min(found) if found else None


def order_split_outputs(dg) -> None:
    """Sort every split's output nodes by the section each reads (see the module docstring); a
    split whose consumers cannot all be placed is left as torch-pruning built it."""
    for node in dg.module2node.values():
        if node.type != _OP.SPLIT or len(node.outputs) < 2:
            continue
        sections = [_section_of(out, node) for out in node.outputs]
        if None in sections or sections == sorted(sections):
            continue
        order = sorted(range(len(sections)), key=sections.__getitem__)
        node.outputs[:] = [node.outputs[i] for i in order]
        for cat in dg.module2node.values():  # concatenation sizes read the split's sections by position
            if cat.type == _OP.CONCAT and node in cat.inputs:
                cat.module.concat_sizes = None


#: functions whose split sizes are numbers given by the forward (``chunk`` recomputes them)
_FIXED_SPLITS = {"split", "split_with_sizes"}


def _channel_split_sizes(node) -> list[int] | None:
    """The section sizes of a split on torch-pruning's channel axis (dim 1), else None."""
    grad_fn = node.grad_fn
    sizes = _input_sizes(node)
    dim = getattr(grad_fn, "_saved_dim", None)
    if sizes is None or not isinstance(dim, int) or dim % len(sizes) != 1:
        return None
    split_sizes = getattr(grad_fn, "_saved_split_sizes", None)
    if split_sizes is not None:
        return [int(v) for v in split_sizes]
    size = getattr(grad_fn, "_saved_split_size", None)
    if size is None:
        return None
    total, size = sizes[1], int(size)
    return [min(size, total - start) for start in range(0, total, size)]


def stop_fixed_splits(dg, state: ReshapeState, funcs: dict, describe) -> list:
    """Stop index propagation at each channel split whose sizes the forward passes as numbers
    (``funcs``: autograd node -> the torch function that made it, from ``OpOwners``); the groups
    reaching it keep their width by design. ``describe(node)`` names the block running it."""
    stopped = []
    for node in dg.module2node.values():
        if node.type != _OP.SPLIT or funcs.get(node.grad_fn) not in _FIXED_SPLITS:
            continue
        sizes = _channel_split_sizes(node)
        if sizes is None:
            continue
        state.stop_at(node, by_design=True, why=(
            f"{describe(node)} splits these channels into sections of {sizes} given as numbers in the "
            "forward, so their width stays (pruning it would break the split; the other layers are pruned)"))
        stopped.append(node)
    return stopped


def _reshape_edges(node) -> Iterator:
    """Every dependency between a reshape node and its neighbours (both directions)."""
    yield from node.dependencies
    for neighbour in [*node.inputs, *node.outputs]:
        yield from (dep for dep in neighbour.dependencies if dep.target is node)


def _fix_flatten(node, spatial: int) -> None:
    """A 4-D (B, C, H, W) input flattened: channel c becomes features c*H*W .. (c+1)*H*W - 1, so
    the stride is H*W whatever torch-pruning inferred from the layers after it (a concatenation
    in between makes that the concatenation's width); H*W == 1 maps channels one to one."""
    for dep in _reshape_edges(node):
        mapping = dep.index_mapping[0]
        if isinstance(mapping, index_mapping._FlattenIndexMapping) and mapping._stride != spatial:
            if spatial == 1:
                dep.index_mapping[0] = None
            else:
                mapping._stride = spatial


class _ShuffleMapping:
    """Index mapping of a channel shuffle's view back (``view(b, g, C/g, h, w).transpose(1, 2)``
    then ``view(b, C, h, w)``): channel ``c = a * C/g + b`` becomes ``b * g + a`` (``reverse``:
    the inverse permutation). ``channels`` is read when called (pruning changes C, never g)."""

    def __init__(self, groups: int, channels, reverse: bool) -> None:
        self.groups, self.channels, self.reverse = groups, channels, reverse

    def __call__(self, idxs):
        from torch_pruning import _helpers

        g, per = self.groups, self.channels() // self.groups
        if self.reverse:
            return [_helpers._HybridIndex(idx=(i.idx % g) * per + i.idx // g, root_idx=i.root_idx) for i in idxs]
        return [_helpers._HybridIndex(idx=(i.idx % per) * g + i.idx // per, root_idx=i.root_idx) for i in idxs]


def _is_depthwise(module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups == module.in_channels == module.out_channels


def _shuffle_producer(node):
    """The conv whose output channels reach the shuffle's first view through channel-wise ops only."""
    current = node
    for _ in range(_MAX_WALK):
        if len(current.inputs) != 1:
            return None
        current = current.inputs[0]
        if current.type == _OP.CONV and not _is_depthwise(current.module):
            return current.module
        if current.type not in (_OP.BN, _OP.ELEMENTWISE, _OP.RESHAPE) or len(current.outputs) != 1:
            return None
    return None


def _shuffle_consumers(node) -> list[int] | None:
    """The grouped-conv group counts of the layers reading the shuffled channels (1: a plain conv),
    walking through single-input channel-wise ops and depthwise convs; None when the channels
    reach anything else (a join, a reshape, a split, a Linear, the output)."""
    found, frontier, seen = [], list(node.outputs), set()
    while frontier:
        current = frontier.pop()
        if current in seen:
            continue
        seen.add(current)
        if len(seen) > 4 * _MAX_WALK:
            return None
        if current.type == _OP.CONV and not _is_depthwise(current.module):
            found.append(current.module.groups)
            continue
        if not (current.type in (_OP.BN, _OP.ELEMENTWISE) or _is_depthwise(current.module)) \
                or len(current.inputs) != 1 or not current.outputs:
            return None
        frontier.extend(current.outputs)
    return found or None


def _shuffle_units(channels: int, groups: int, producer_groups: int, consumer_groups: list[int]) -> int | None:
    """torch-pruning's ``out_channel_groups`` for the producer of a channel shuffle, so each pruned
    unit stays whole groups on both sides: channels at the same position of every producer group
    go together, and so do channels at the same position of every consumer group (after the
    permutation). The units must be ``{c : c % m == r}`` (torch-pruning's channel-group pattern,
    ``C / m`` groups of ``m``); None otherwise."""
    parent = list(range(channels))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a: int, b: int) -> None:
        parent[find(a)] = find(b)

    per = channels // groups
    inverse = [0] * channels  # position after the shuffle -> channel before it
    for c in range(channels):
        inverse[(c % per) * groups + c // per] = c
    if producer_groups > 1:
        size = channels // producer_groups
        for c in range(channels):
            union(c, c % size)
    for g in consumer_groups:
        if g > 1:
            size = channels // g
            for n in range(channels):
                union(inverse[n], inverse[n % size])
    roots = [find(c) for c in range(channels)]
    m = len(set(roots))
    if channels % m or any(roots[c] != roots[c % m] for c in range(channels)):
        return None
    return channels // m


def map_shuffle(graph, node, state: ReshapeState) -> bool:
    """Map a channel shuffle's view back as a permutation (``_ShuffleMapping``) when the conv feeding
    it and the convs reading it are known, and set the feeding conv's channel groups so pruned
    units are whole groups on both sides (``state.shuffle_groups``). False: left to the caller."""
    sizes = _input_sizes(node)
    first = node
    for _ in range(4):  # back to the first view (transpose and copies in between)
        first = first.inputs[0] if len(first.inputs) == 1 else None
        if first is None or first.type == _OP.RESHAPE:
            break
    if sizes is None or first is None or first.type != _OP.RESHAPE:
        return False
    producer, consumers = _shuffle_producer(first), _shuffle_consumers(node)
    if producer is None or consumers is None:
        return False
    groups = sizes[2]  # (B, C/g, g, H, W) after the transpose
    if producer not in state.shuffle_groups:
        channels = producer.out_channels
        if channels != sizes[1] * sizes[2]:
            return False
        units = _shuffle_units(channels, groups, producer.groups, consumers)
        if units is None:
            return False
        state.shuffle_groups[producer] = units

    def current() -> int:
        return producer.out_channels

    _map_through(node, lambda reverse: _ShuffleMapping(groups, current, reverse=reverse))
    return True


def _map_through(node, mapping) -> None:
    """Give the edges between ``node`` and its first input the index mapping ``mapping(reverse)``:
    reverse=True from the node back to its input, False from the input forward to the node."""
    inp = node.inputs[0]
    for dep in node.dependencies:
        if dep.target is inp:
            dep.index_mapping[0] = mapping(True)
    for dep in inp.dependencies:
        if dep.target is node:
            dep.index_mapping[0] = mapping(False)


def _channels_last(graph, node) -> int | None:
    """The channel count C when ``node``'s input (4-D or more) is channels-last (B, ..., C): its
    last axis is as wide as the layer feeding it and axis 1 is not; None otherwise (channels-first
    or unknown)."""
    sizes = _input_sizes(node)
    if sizes is None or len(sizes) < 4 or len(node.inputs) != 1:
        return None
    channels = _channels(graph, node.inputs[0])
    # more than one channel: a 1-channel gate broadcast over the features can make the inference read 1
    return channels if channels and channels > 1 and sizes[-1] == channels and sizes[1] != channels else None


class _ChannelsLastFlatten:
    """Index mapping of a channels-last flatten: channel ``c`` of C becomes features ``p * C + c``
    for each of ``positions`` positions (``reverse``: feature ``f`` comes from channel ``f % C``).
    ``channels()`` gives the current C (pruning changes it, never the positions)."""

    def __init__(self, channels, positions: int, reverse: bool) -> None:
        self.channels, self.positions, self.reverse = channels, positions, reverse

    def __call__(self, idxs):
        from torch_pruning import _helpers

        channels = self.channels()
        if self.reverse:
            return list({_helpers._HybridIndex(idx=i.idx % channels, root_idx=i.root_idx) for i in idxs})
        return [_helpers._HybridIndex(idx=p * channels + i.idx, root_idx=i.root_idx)
                for i in idxs for p in range(self.positions)]


_ONE_TO_ONE = "one to one"


def channels_last_layout(graph, node, state: ReshapeState):
    """How channels cross a reshape or slice of a channels-last tensor: ``_ONE_TO_ONE``, the
    number of positions of a flatten (channel c of position p at p * C + c), or None (not
    channels-last, or a reshape of more than 4 dimensions that does not keep C last). Decided once,
    when the graph is traced: torch-pruning maps indices again after each cut, and the traced
    sizes then no longer match the pruned widths."""
    if node in state.layouts:
        return state.layouts[node]
    layout = None
    sizes = _input_sizes(node)
    channels = _channels_last(graph, node)
    if channels is not None and sizes is not None:
        if node.type == _OP.SLICE:
            dim = getattr(node.grad_fn, "_saved_dim", None)
            layout = _ONE_TO_ONE if isinstance(dim, int) and dim % len(sizes) != len(sizes) - 1 else None
        else:
            after, positions = _channels_after(graph, node), sizes[1] * sizes[2]
            if after == channels:
                layout = _ONE_TO_ONE
            elif len(sizes) == 4:
                layout = positions if after == positions * channels and positions > 1 else _ONE_TO_ONE
    state.layouts[node] = layout
    return layout


def _channels_after(graph, node) -> int | None:
    """The features the layers after ``node`` read (torch-pruning's inference), None if unknown."""
    for out in node.outputs:
        after = shape_infer.infer_in_channels_recursively(graph, out, [0])
        if after is not None:
            return after
    return None


def _one_to_one(node) -> None:
    """Channels cross ``node`` unchanged: no index mapping on its edges."""
    for dep in _reshape_edges(node):
        dep.index_mapping[0] = None


def _fix_channels_last_reshape(graph, node, layout) -> None:
    """A reshape of a channels-last (B, H, W, C) tensor (see the module docstring): one to one when
    the layers after it read C features per position, ``_ChannelsLastFlatten`` when they read the
    flattened H*W*C (``layout``: the number of positions)."""
    if layout == _ONE_TO_ONE:
        _one_to_one(node)
        return
    inp = node.inputs[0]

    def channels() -> int:
        return _channels(graph, inp) or 1

    _map_through(node, lambda reverse: _ChannelsLastFlatten(channels, layout, reverse=reverse))


def fix_channels_last_slices(graph, state: ReshapeState) -> list:
    """A slice of a channels-last 4-D tensor along a spatial axis (LeViT's ``[:, ::2, ::2]``)
    keeps every channel: its edges map channels one to one (torch-pruning mapped axis 1 as
    channels). Returns the slice nodes changed."""
    fixed = []
    for node in graph.module2node.values():
        if node.type != _OP.SLICE or channels_last_layout(graph, node, state) != _ONE_TO_ONE:
            continue
        _one_to_one(node)
        fixed.append(node)
    return fixed


def guard_groups(dg, state: ReshapeState) -> None:
    """Every later group of ``dg`` is built under ``reshape_rule`` and carries ``edgekd_unmapped``:
    the unmapped reshapes it reached (empty: an ordinary group)."""
    build = dg.get_pruning_group

    def guarded(module, pruning_fn, idxs):
        with reshape_rule(state):
            state.reached.clear()
            group = build(module, pruning_fn, idxs)
        group.edgekd_unmapped = set(state.reached)
        return group

    dg.get_pruning_group = guarded


def reached_unmapped(group) -> bool:
    """True when a pruning group reached a reshape torch-pruning cannot map (it stopped there)."""
    return bool(getattr(group, "edgekd_unmapped", None))


def stop_reasons(group, state: ReshapeState) -> tuple[str, bool]:
    """Why a group that reached stops is kept whole, and whether every stop is by design."""
    nodes = sorted(getattr(group, "edgekd_unmapped", ()), key=lambda n: str(n))
    reasons = list(dict.fromkeys(state.why.get(n, SHUFFLE_REASON) for n in nodes))
    return "; ".join(reasons), bool(nodes) and all(n in state.by_design for n in nodes)


def _no_channels(_idxs):
    """Index mapping of an edge that carries no channel correspondence (a broadcast input)."""
    return []


def _channels(dg, node) -> int | None:
    try:
        return shape_infer.infer_out_channels_recursively(dg, node, [0])
    except (IndexError, TypeError, ZeroDivisionError):
        return None


def cut_broadcast_inputs(dg) -> list:
    """At each element-wise op with several inputs, the inputs of one channel broadcast over
    inputs of more: their edges to the op stop index propagation (see the module docstring).
    Returns the broadcast input nodes."""
    cut = []
    for node in list(dg.module2node.values()):
        if not _is_join(node):
            continue
        widths = {inp: _channels(dg, inp) for inp in node.inputs}
        if not any(w is not None and w > 1 for w in widths.values()):
            continue
        for inp, width in widths.items():
            if width != 1:
                continue
            for dep in node.dependencies:
                if dep.target is inp:
                    dep.index_mapping[0] = _no_channels
            for dep in inp.dependencies:
                if dep.target is node:
                    dep.index_mapping[0] = _no_channels
            cut.append(inp)
    return cut


def _is_join(node) -> bool:
    return node.type == _OP.ELEMENTWISE and len(node.inputs) >= 2


def _joins_reached(start) -> set:
    """Element-wise ops with several inputs reached from ``start`` through channel-wise ops."""
    found, frontier, seen = set(), [start], set()
    for _ in range(_MAX_WALK):
        nxt = []
        for node in frontier:
            if node in seen:
                continue
            seen.add(node)
            if _is_join(node):
                found.add(node)
            elif node.type in _CHANNELWISE:
                nxt.extend(node.outputs)
        frontier = nxt
    return found


def _source_layer(split) -> nn.Module | None:
    """The conv/linear layer whose output channels reach ``split`` through channel-wise ops only."""
    node = split
    for _ in range(_MAX_WALK):
        if len(node.inputs) != 1:
            return None
        node = node.inputs[0]
        if node.type in (_OP.CONV, _OP.LINEAR):
            return node.module
        if node.type not in _CHANNELWISE or len(node.outputs) != 1:
            return None
    return None


def _equal_channel_parts(split) -> int:
    """The number of equal parts a split cuts the channel axis into (0: not such a split)."""
    saved_dim = getattr(split.grad_fn, "_saved_dim", 1)
    if isinstance(saved_dim, int) and saved_dim != 1:
        return 0  # torch-pruning maps channel splits (dim 1) only
    offsets = getattr(split.module, "offsets", None)
    if not offsets or len(offsets) < 3:
        return 0
    sizes = {b - a for a, b in zip(offsets, offsets[1:], strict=False)}
    return len(offsets) - 1 if len(sizes) == 1 else 0


def chunk_gates(dg) -> dict[nn.Module, int]:
    """Layers whose output is chunked into ``k`` equal channel parts that are combined again
    element-wise (a gate): ``{layer: k}`` for torch-pruning's ``out_channel_groups``."""
    gates: dict[nn.Module, int] = {}
    for node in dg.module2node.values():
        if node.type != _OP.SPLIT:
            continue
        parts = _equal_channel_parts(node)
        if parts < 2 or len(node.outputs) < parts:
            continue
        joins = [_joins_reached(out) for out in node.outputs]
        if not set.intersection(*joins):
            continue  # the parts go separate ways (ShuffleNet's chunk): ordinary split mapping
        layer = _source_layer(node)
        if layer is not None:
            gates[layer] = parts
    return gates
