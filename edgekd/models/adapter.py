"""One output adapter: whatever a model's forward returns, in either mode, the pipeline sees a logits tensor.

Hugging Face models return ``ModelOutput`` objects with ``.logits``; research code returns dicts or
tuples; models with deep supervision (GoogLeNet/Inception style auxiliary classifiers) return
``(logits, aux_logits)`` in training mode and the logits alone in eval mode. ``adapt`` probes BOTH
modes, so the teacher trains and the student distils on the main head, while export (always in eval
mode) traces the eval path. Wrapping once here keeps every stage (training, pruning traces, KD
losses, ONNX/ExecuTorch export) free of such cases.

``check_batch_axis`` is the other half of the output contract: a model must give ``(N, classes)``
for every batch size N, including 1 (a bare ``.squeeze()`` after pooling drops the batch axis of a
batch of one; see its docstring for why such a model is refused rather than patched).
"""

from __future__ import annotations

import difflib
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from edgekd.errors import ModelError

_HINT = "return a tensor, a tuple whose first item is the logits, a dict with 'logits', or an object with .logits"


def _tensors(output: Any) -> Iterator[Tensor]:
    """The tensors of a (possibly nested) output, in order: dict values, tuple/list items."""
    if isinstance(output, Tensor):
        yield output
    elif isinstance(output, Mapping):
        for value in output.values():
            yield from _tensors(value)
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _tensors(item)


#: keys a mapping's main logits go by, in this order (Hugging Face: ``logits``; torchvision's segmentation
#: models: ``out`` beside ``aux``)
MAIN_KEYS = ("logits", "out", "output", "main", "pred", "preds", "prediction", "predictions")
#: a key holding this marks an auxiliary (deep-supervision) head: never the main logits while another fits
AUX_MARKER = "aux"


def _fits(tensor: Any, sample_shape: tuple[int, ...] | None) -> bool:
    return isinstance(tensor, Tensor) and (sample_shape is None or tuple(tensor.shape[1:]) == tuple(sample_shape))


def _main_of_mapping(output: Mapping, sample_shape: tuple[int, ...] | None) -> Tensor | None:
    """A mapping's main logits: the first of ``MAIN_KEYS`` that fits, else the first fitting tensor under a key
    that does not name an auxiliary head. A dict ordered ``{"aux": ..., "out": ...}`` (by depth) used to give
    its aux head: the teacher trained that head while eval mode used the untrained main one."""
    for key in MAIN_KEYS:
        if _fits(output.get(key), sample_shape):
            return output[key]
    for key, value in output.items():
        if AUX_MARKER not in str(key).lower():
            for tensor in _tensors(value):
                if _fits(tensor, sample_shape):
                    return tensor
    return None


def logits_of(output: Any, sample_shape: tuple[int, ...] | None = None) -> Tensor:
    """The main logits in a model output.

    Order: a tensor itself; ``.logits`` (Hugging Face ``ModelOutput``, named tuples such as
    torchvision's ``InceptionOutputs``); a mapping's main head (``_main_of_mapping``: ``MAIN_KEYS``,
    then any key not naming an ``aux`` head); else the first tensor, in order, whose per-sample shape is
    ``sample_shape`` (the eval-mode logits' shape without the batch axis, when known), else the first
    tensor. Raises ``ModelError`` when the output holds no tensor.
    """
    if isinstance(output, Tensor):
        return output
    named = getattr(output, "logits", None)
    if isinstance(named, Tensor):
        return named
    if isinstance(output, Mapping):
        main = _main_of_mapping(output, sample_shape)
        if main is not None:
            return main
    tensors = list(_tensors(output))
    if sample_shape is not None:
        for tensor in tensors:
            if tuple(tensor.shape[1:]) == tuple(sample_shape):
                return tensor
    if tensors:
        return tensors[0]
    raise ModelError(f"cannot find logits in a model output of type {type(output).__name__}", hint=_HINT)


class LogitsAdapter(nn.Module):
    """Wraps a model whose forward does not return a plain tensor (in train or eval mode).

    ``forward`` returns the main logits ``(N, classes)`` in both modes. State-dict keys gain
    ``model.``. ``sample_shape`` (the eval logits' shape per sample) picks the main head among
    several outputs of a training-mode forward; it is a plain attribute, not state.
    """

    def __init__(self, model: nn.Module, sample_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.model = model
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else None

    def forward(self, x: Tensor) -> Tensor:
        return logits_of(self.model(x), self.sample_shape)


# Layer names as the user writes them. They live here, next to LogitsAdapter, because they unwrap it;
# pruning (``ignore``, ``layers``) and distillation (``student_layer``/``teacher_layer``) both import them
# from models, so neither stage depends on the other.


def _wrapped(model: nn.Module) -> bool:
    return isinstance(model, LogitsAdapter)


def layer_names(model: nn.Module) -> list[str]:
    """Every submodule path as the user writes it: in their own model, without the ``model.`` prefix
    edgekd's output adapter (``LogitsAdapter``, for dict / ``.logits`` / Hugging Face outputs) adds."""
    names = [name for name, _ in model.named_modules() if name]
    if _wrapped(model):
        names = [n.removeprefix("model.") for n in names if n != "model"]
    return names


def layer_candidates(model: nn.Module, name: str) -> list[str]:
    """The paths ``name`` may mean in ``model``: itself and, inside the adapter, ``model.<name>``."""
    return [name, f"model.{name}"] if _wrapped(model) else [name]


def find_layer(model: nn.Module, name: str) -> nn.Module | None:
    """The submodule a user's layer name means (see ``layer_candidates``), or None. The one resolver of
    layer names: pruning (``ignore``, ``layers``) and distillation (``student_layer``/``teacher_layer``)
    both call it, so a name that works in one works in the other."""
    modules = dict(model.named_modules())
    return next((modules[c] for c in layer_candidates(model, name) if c in modules), None)


def close_names_hint(model: nn.Module, name: str) -> str:
    """'did you mean ...?' with the closest layer names, else the top-level modules."""
    names = layer_names(model)
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    tops = sorted({n.split(".")[0] for n in names})
    return "top-level modules: " + ", ".join(tops) if tops else "the model has no submodules"


def _train_mode_output(model: nn.Module, example: Tensor) -> Any:
    """One training-mode forward that leaves no trace: BatchNorm statistics, other buffers and the
    random number generators (dropout) are restored, so probing does not change training."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            return model.train()(example)
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])


def adapt(model: nn.Module, example: Tensor) -> nn.Module:
    """Return ``model`` itself when its forward yields a tensor in eval AND training mode, else a
    ``LogitsAdapter`` around it. ``example``: a batch of at least 2 (BatchNorm in training mode)."""
    was_training = model.training
    try:
        with torch.no_grad():
            eval_out = model.eval()(example)
        eval_logits = logits_of(eval_out)
        try:
            train_out = _train_mode_output(model, example)
        except Exception:  # noqa: BLE001 - a train-mode failure surfaces (with its cause) when training starts
            train_out = eval_logits
    finally:
        model.train(was_training)
    if isinstance(eval_out, Tensor) and isinstance(train_out, Tensor):
        return model
    return LogitsAdapter(model, tuple(eval_logits.shape[1:]))


# -- the batch axis ---------------------------------------------------------------------------
def _frame_of_user_code(stack: list[traceback.FrameSummary]) -> traceback.FrameSummary | None:
    """The innermost frame outside torch and edgekd: where the user's forward called the op."""
    skip = (f"{Path(torch.__file__).parent}", f"{Path(__file__).parent.parent}")
    for frame in reversed(stack):
        if not frame.filename.startswith(skip) and "<frozen" not in frame.filename:
            return frame
    return None


class _OpRecorder(TorchFunctionMode):
    """Records each torch call's name, output shape and calling source line (eager, one forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...] | None, traceback.FrameSummary | None]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shape = tuple(out.shape) if isinstance(out, Tensor) else None
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", str(func))
        for base in ("_TensorBase.", "TensorBase."):
            if name.startswith(base):
                name = "Tensor." + name.removeprefix(base)
        self.calls.append((name, shape, _frame_of_user_code(traceback.extract_stack()[:-1])))
        return out


def _module_shapes(model: nn.Module, x: Tensor) -> tuple[dict[str, tuple], _OpRecorder]:
    """One eval forward: per-module (first input shape, output shape) and the op record, as far as
    the forward got (a forward that fails at batch 1 still shows where the batch axis went)."""
    shapes: dict[str, tuple] = {}

    def hook(name):
        def record(_mod, args, out):
            first_in = next((tuple(a.shape) for a in args if isinstance(a, Tensor)), None)
            out_t = next(_tensors(out), None)
            shapes.setdefault(name, (first_in, tuple(out_t.shape) if out_t is not None else None))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    recorder = _OpRecorder()
    try:
        with torch.no_grad(), recorder:
            model(x)
    except Exception:  # noqa: BLE001 - what ran before the failure is what we need
        pass
    finally:
        for h in handles:
            h.remove()
    return shapes, recorder


def _keeps_batch(shape: tuple | None, batch: int, reference: tuple | None) -> bool:
    """A tensor of a batch-``batch`` forward has its batch axis when it has the reference's rank
    (the same tensor at a larger batch) and leads with ``batch``."""
    if shape is None or reference is None:
        return True
    return len(shape) == len(reference) and (not shape or shape[0] == batch)


def _where_batch_axis_is_lost(model: nn.Module, x1: Tensor, x2: Tensor) -> str:
    """Name the module and, when it can be found, the torch call and source line where a batch of
    one loses the batch axis that a batch of two keeps."""
    shapes1, ops1 = _module_shapes(model, x1)
    shapes2, ops2 = _module_shapes(model, x2)
    prefix = "model." if isinstance(model, LogitsAdapter) else ""
    # the innermost module whose input still has the batch axis but whose output has lost it
    # (hooks fire when a module's forward returns, so inner modules come first)
    culprit = next((name for name, (in1, out1) in shapes1.items()
                    if _keeps_batch(in1, 1, shapes2.get(name, (None, None))[0])
                    and not _keeps_batch(out1, 1, shapes2.get(name, (None, None))[1])), None)
    parts = []
    if culprit is not None:
        shown = culprit.removeprefix(prefix) if culprit != "model" or not prefix else ""
        module = dict(model.named_modules())[culprit]
        where = f"`{shown}` ({type(module).__name__})" if shown else f"the model's own forward ({type(module).__name__})"
        parts.append(f"in {where}")
    # the same calls in the same order (no shape-dependent control flow): compare them pairwise
    if [c[0] for c in ops1.calls] == [c[0] for c in ops2.calls][:len(ops1.calls)]:
        for (name, s1, frame), (_n2, s2, _f2) in zip(ops1.calls, ops2.calls, strict=False):
            if s1 is not None and s2 is not None and len(s2) >= 2 and s2[0] == 2 and not _keeps_batch(s1, 1, s2):
                line = f"{Path(frame.filename).name}:{frame.lineno}" if frame else "?"
                code = f": `{frame.line.strip()}`" if frame and frame.line else ""
                parts.append(f"at {name} ({line}{code}), which gives {tuple(s1)} for one sample and "
                             f"{tuple(s2)} for two")
                break
    return ("it is lost " + ", ".join(parts)) if parts else "no single module or call could be named"


def check_batch_axis(model: nn.Module, example: Tensor) -> None:
    """Refuse a model whose eval-mode output does not keep the batch axis at every batch size.

    Runs batches of 1, 2 and 3 (from ``example``, repeated when shorter); each must give
    ``(N, classes)``. A bare ``.squeeze()`` after global pooling gives ``(classes,)`` for one sample:
    training survives it (batches are large), but a phone runs batch 1, and each exporter bakes
    the squeeze differently (ONNX squeezes the traced size-1 axes and returns ``(1, classes)``;
    ExecuTorch's ``.pte`` refuses batch 1). Patching the output afterwards cannot reach the
    squeeze inside the model, so the model is refused, naming the module, the call and the line,
    with the one-line fix. Raises ``ModelError`` (exit 2).
    """
    x = example.detach()
    while len(x) < 3:
        x = torch.cat([x, x])
    was_training = model.training
    model.eval()
    outs: dict[int, Tensor | str] = {}
    try:
        for n in (1, 2, 3):
            try:
                with torch.no_grad():
                    outs[n] = logits_of(model(x[:n].contiguous()))
            except ModelError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. a layer after the squeeze refusing its input
                outs[n] = f"fails ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]})"
        if isinstance(outs[2], str):
            raise ModelError(f"the model's forward {outs[2]} on a batch of 2 in eval mode",
                             hint="check the model's input shape against the data's (see edgekd validate)")
        broken = [n for n, out in outs.items() if isinstance(out, str) or out.dim() < 2 or out.shape[0] != n]
        if not broken:
            return
        where = _where_batch_axis_is_lost(model, x[:1].contiguous(), x[:2].contiguous())
    finally:
        model.train(was_training)
    shapes = ", ".join(f"batch {n}: {out if isinstance(out, str) else tuple(out.shape)}" for n, out in outs.items())
    raise ModelError(
        f"the model's output does not keep the batch axis ({shapes}; expected (N, classes)): {where}",
        hint="keep the batch axis explicitly: torch.flatten(x, 1) or x.squeeze(-1).squeeze(-1) instead of a bare "
             ".squeeze(); x.view(x.size(0), -1) instead of a reshape with a fixed size")
