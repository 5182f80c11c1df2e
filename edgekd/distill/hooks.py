"""Read intermediate tensors by module path through forward hooks, so losses never touch model code
(the torchdistill way). Works the same on a plain model, a ``LogitsAdapter`` and under DDP, because
the hooks sit on the submodules themselves."""

from __future__ import annotations

import difflib

import torch
from torch import Tensor, nn

from edgekd.errors import RecipeError
from edgekd.models.adapter import LogitsAdapter


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


def resolve_layer(model: nn.Module, name: str, *, key: str | None = None, role: str = "model") -> nn.Module:
    """The submodule at ``name`` (``find_layer``), or a ``RecipeError`` at ``key`` that lists close names."""
    module = find_layer(model, name)
    if module is None:
        raise RecipeError(f"the {role} has no layer {name!r}", key=key, hint=close_names_hint(model, name))
    return module


def _first_tensor(output) -> Tensor:
    # nn.MultiheadAttention and some blocks return tuples; the features are the first tensor
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"layer output of type {type(output).__name__} holds no tensor")


class FeatureTap:
    """Forward hooks on named layers of one model; ``features[name]`` is the latest output."""

    def __init__(self, model: nn.Module, names: list[str], *, role: str = "model") -> None:
        self.features: dict[str, Tensor] = {}
        self._handles = []
        for name in dict.fromkeys(names):
            module = resolve_layer(model, name, role=role)
            self._handles.append(module.register_forward_hook(self._store(name)))

    def _store(self, name: str):
        def hook(_module, _inputs, output) -> None:
            self.features[name] = _first_tensor(output)
        return hook

    def clear(self) -> None:
        self.features.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.features.clear()


@torch.no_grad()
def probe(model: nn.Module, x: Tensor, names: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """One eval-mode forward: (logits, {name: feature}) for the named layers (names must exist)."""
    tap = FeatureTap(model, names)
    was_training = model.training
    try:
        logits = model.eval()(x)
        return logits, dict(tap.features)
    finally:
        model.train(was_training)
        tap.remove()
