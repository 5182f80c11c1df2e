"""Read intermediate tensors by module path through forward hooks, so losses never touch model code
(the torchdistill way). Works the same on a plain model, a ``LogitsAdapter`` and under DDP, because
the hooks sit on the submodules themselves."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edgekd.errors import RecipeError
from edgekd.models.adapter import close_names_hint, find_layer


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
