"""Which coupled groups can be pruned safely, and how a model is run to check it.

torch-pruning traces a model once and replays index arithmetic through the operations it saw.
Some user code defeats that arithmetic: ``torch.split`` with section sizes stored as ints at
construction, channel shuffle (reshape -> transpose -> reshape), heads taken by indexing, the
concatenation of pooled branches. Its symptoms are an ``IndexError`` while scoring a group, or a
pruned model whose forward no longer runs. ``edgekd.prune.pruner`` keeps such a group whole and
carries on; this module describes the failure (which layers, which operation, where) and runs
the forward checks.

Models whose forward differs in training mode (an auxiliary head returned only then) are traced
through their training-mode path, so the train-only layers are pruned with the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from edgekd.models.adapter import LogitsAdapter, logits_of

#: torch-pruning node types that re-map channel indices (where user code most often defeats it)
_INDEX_OPS = {
    tp.ops.OPTYPE.SPLIT: "torch.split/chunk",
    tp.ops.OPTYPE.CONCAT: "torch.cat",
    tp.ops.OPTYPE.RESHAPE: "reshape/view",
    tp.ops.OPTYPE.UNBIND: "unbind",
    tp.ops.OPTYPE.SLICE: "slicing",
    tp.ops.OPTYPE.EXPAND: "expand",
}


def tensors_of(output: Any) -> list[Tensor]:
    """Every tensor in a model output (tensor, tuple/list, dict, ``ModelOutput``), in order."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict) or hasattr(output, "to_tuple"):
        values = list(output.values()) if isinstance(output, dict) else list(output.to_tuple())
        return [t for v in values for t in tensors_of(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in tensors_of(v)]
    return []


def inner_model(model: nn.Module) -> nn.Module:
    """The user's model inside edgekd's output adapter (its forward returns every output)."""
    return model.model if isinstance(model, LogitsAdapter) else model


@contextmanager
def kept_buffers(model: nn.Module):
    """Run a block (a training-mode forward) and restore every buffer (BatchNorm running
    statistics, ``num_batches_tracked``) and the train/eval flag afterwards."""
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in saved and buffer.shape == saved[name].shape:
                    buffer.copy_(saved[name])
        model.train(was_training)


def output_shapes(model: nn.Module, example: Tensor, train: bool) -> list[tuple[int, ...]]:
    """Shapes of every output tensor of the user's model, in eval or training mode (buffers
    restored), under no_grad."""
    net = inner_model(model)
    with kept_buffers(net), torch.no_grad():
        out = net.train(train)(example)
    return [tuple(t.shape) for t in tensors_of(out)]


def train_outputs_differ(model: nn.Module, example: Tensor) -> bool:
    """True when training mode returns more output tensors than eval mode (auxiliary heads)."""
    try:
        return len(output_shapes(model, example, True)) > len(output_shapes(model, example, False))
    except Exception:  # noqa: BLE001 - a model that cannot run a 2-sample training batch: trace eval only
        return False


def train_mode_forward(model: nn.Module, example: Tensor) -> Tensor:
    """torch-pruning ``forward_fn``: the training-mode path of the user's model, every output
    summed into one scalar so the tracer reaches train-only layers. Buffers are restored."""
    net = inner_model(model)
    with kept_buffers(net):
        out = net.train()(example)
    return sum(t.float().sum() for t in tensors_of(out))  # type: ignore[return-value]


@dataclass
class Probe:
    """How the pruned model is checked after each group: the logits keep their shape, and (when
    the training path was traced) the training-mode forward still runs with the same main logits.
    Other outputs (features, hidden states) may change width with the layers pruned."""

    example: Tensor
    eval_shape: tuple[int, ...]
    train_shape: tuple[int, ...] | None  # None: training mode is not checked

    @classmethod
    def of(cls, model: nn.Module, example: Tensor, check_train: bool) -> Probe:
        return cls(example, _logits_shape(model, example, False),
                   _logits_shape(model, example, True) if check_train else None)

    def failure(self, model: nn.Module) -> str | None:
        """None when the model still runs with the same logits shape, else why not."""
        for train, expected in ((False, self.eval_shape), (True, self.train_shape)):
            if expected is None:
                continue
            mode = "training" if train else "eval"
            try:
                shape = _logits_shape(model, self.example, train)
            except Exception as exc:  # noqa: BLE001 - any failure of the user's forward is the finding
                return f"the {mode}-mode forward fails: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            if shape != expected:
                return f"the {mode}-mode logits change shape from {expected} to {shape}"
        return None


def _logits_shape(model: nn.Module, example: Tensor, train: bool) -> tuple[int, ...]:
    """Shape of the logits: the adapted model's output in eval mode; in training mode the user's
    model runs (every train-only layer with it) and its main logits are taken (buffers restored)."""
    if not train:
        was_training = model.training
        try:
            with torch.no_grad():
                return tuple(model.eval()(example).shape)
        finally:
            model.train(was_training)
    net = inner_model(model)
    with kept_buffers(net), torch.no_grad():
        out = net.train()(example)
    return tuple(logits_of(out).shape)


# -- describing a group ---------------------------------------------------------------------
def module_names(model: nn.Module) -> dict[nn.Module, str]:
    """Module -> name as the user writes it (without the adapter's ``model.`` prefix)."""
    wrapped = isinstance(model, LogitsAdapter)
    return {m: (n.removeprefix("model.") if wrapped else n) for n, m in model.named_modules()}


def out_layers(group, names: dict[nn.Module, str], dg) -> list[str]:
    """Names of the conv/linear layers whose *outputs* a group prunes, in group order."""
    seen: list[str] = []
    for dep, _ in group:
        module = dep.target.module
        if dg.is_out_channel_pruning_fn(dep.handler) and isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            name = names.get(module)
            if name is not None and name not in seen:
                seen.append(name)
    return seen


class OpOwners(TorchFunctionMode):
    """Which module's forward ran each tensor operation: while active (around torch-pruning's
    trace), maps each result's ``grad_fn`` to ``(name, module)`` of the innermost module running,
    so a functional op (``torch.cat``, ``x.chunk``, ``x.view`` in a block's forward) is named by
    the block that owns it. Names are the user's (no adapter prefix); "" is the root module."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.owners: dict[Any, tuple[str, nn.Module]] = {}
        self.funcs: dict[Any, str] = {}  # grad_fn -> name of the torch function that made it ("split", "chunk")
        self._stack: list[tuple[str, nn.Module]] = []
        self._model = model
        self._handles: list = []

    def __enter__(self):
        for module, name in module_names(self._model).items():
            self._handles.append(module.register_forward_pre_hook(
                lambda mod, _args, name=name: self._stack.append((name, mod))))
            self._handles.append(module.register_forward_hook(self._leave, always_call=True))
        return super().__enter__()

    def _leave(self, _module, _args, _output) -> None:  # a forward hook must return None (or a new output)
        if self._stack:
            self._stack.pop()

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._stack:
            for tensor in tensors_of(out):
                grad_fn = tensor.grad_fn
                if grad_fn is not None and grad_fn not in self.owners:
                    self.owners[grad_fn] = self._stack[-1]
        for tensor in tensors_of(out):
            if tensor.grad_fn is not None and tensor.grad_fn not in self.funcs:
                self.funcs[tensor.grad_fn] = getattr(func, "__name__", "")
        return out


def owner_text(owner: tuple[str, nn.Module], model: nn.Module) -> str:
    """``stage2.1 (InvertedResidual.forward)``; the root module as ``ShuffleNetV2.forward``."""
    name, module = owner
    if isinstance(module, LogitsAdapter):
        module = module.model
    cls = type(module).__name__
    return f"{name} ({cls}.forward)" if name else f"{cls}.forward"


def _nearest_named(node, names: dict[nn.Module, str], limit: int = 6) -> list[str]:
    """Names of the modules nearest to a functional node (breadth-first over graph neighbours)."""
    frontier, seen, found = [node], {node}, []
    for _ in range(limit):
        nxt = []
        for n in frontier:
            for m in [*n.outputs, *n.inputs]:
                if m in seen:
                    continue
                seen.add(m)
                if m.module in names and names[m.module]:
                    found.append(names[m.module])
                else:
                    nxt.append(m)
        if found:
            return found
        frontier = nxt
    return found


def _common_parent(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for items in zip(*parts, strict=False):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    if len(common) == len(parts[0]) and len(parts) == 1 and len(common) > 1:
        common = common[:-1]  # a single neighbour: the op lives in its parent's forward
    return ".".join(common)


def describe_ops(group, names: dict[nn.Module, str], owners: dict | None = None,
                 model: nn.Module | None = None) -> str:
    """The index-remapping operations in a group and the block whose forward runs them, e.g.
    "torch.split/chunk in block1.spatial (PartialConv.forward)"; "" when the group has none.
    ``owners`` (``OpOwners.owners`` of the traced forward) names the block exactly; without it the
    nearest named layers' common parent is a guess."""
    described: list[str] = []
    for dep, _ in group:
        node = dep.target
        op = _INDEX_OPS.get(node.type)
        if op is None:
            continue
        owner = (owners or {}).get(getattr(node, "grad_fn", None))
        if owner is not None:
            where = owner_text(owner, model)
        else:
            near = _nearest_named(node, names)
            where = _common_parent(near) if near else ""
        text = f"{op} in {where}" if where else op
        if text not in described:
            described.append(text)
    return ", ".join(described[:3])


@dataclass
class GroupFailure:
    """A coupled group that could not be pruned: its layers, the operation and the cause."""

    root: str  # the layer to name in ignored_layers (keeps the whole group)
    layers: list[str]
    operation: str  # "scoring" or "pruning"
    ops: str  # index-remapping ops in the group ("torch.split/chunk in block1.spatial")
    cause: str
    by_design: bool = False  # kept whole because the model's code fixes the width, not because torch-pruning failed

    def reason(self) -> str:
        if self.by_design:  # the cause names the operation that fixes the width
            return f"kept at full width by design: {self.cause}" + (f" (through {self.ops})" if self.ops else "")
        coupled = f"coupled to {self.ops}" if self.ops else f"its group (rooted at {self.root}) failed"
        return f"{coupled}: torch-pruning {self.operation} failed ({self.cause})"


def describe_failure(group, model: nn.Module, dg, operation: str, exc_or_text: BaseException | str,
                     root: nn.Module | None = None, by_design: bool = False) -> GroupFailure:
    names = module_names(model)
    layers = out_layers(group, names, dg) if group is not None else []
    root_name = names.get(root, "") if root is not None else ""
    root_name = root_name or (layers[0] if layers else "?")
    if root_name not in layers:
        layers.insert(0, root_name)
    if isinstance(exc_or_text, BaseException):
        cause = f"{type(exc_or_text).__name__}: {str(exc_or_text).splitlines()[0][:200] if str(exc_or_text) else ''}"
    else:
        cause = exc_or_text
    ops = describe_ops(group, names, getattr(dg, "edgekd_owners", None), model) if group is not None else ""
    return GroupFailure(root=root_name, layers=layers, operation=operation, ops=ops, cause=cause,
                        by_design=by_design)


Check = Callable[[nn.Module], str | None]
