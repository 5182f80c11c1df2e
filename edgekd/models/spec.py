"""How a recipe names a model: a built-in by name, or a user factory, with keyword arguments."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from edgekd.models.adapter import adapt
from edgekd.models.registry import BUILTIN_MODELS, build_model, resolve_factory, unknown_name_hint
from edgekd.recipe.base import StrictModel


class ModelSpec(StrictModel):
    model: str | None = Field(None, description=f"built-in architecture: {', '.join(BUILTIN_MODELS)}")
    factory: str | None = Field(
        None, description="user model as 'package.module:function' (called with kwargs; receives "
        "num_classes and input_shape when its signature accepts them)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the builder")

    @field_validator("model")
    @classmethod
    def _known_builtin(cls, value: str | None) -> str | None:
        if value is not None and value not in BUILTIN_MODELS:
            raise ValueError(f"unknown model {value!r}; {unknown_name_hint(value, list(BUILTIN_MODELS))}")
        return value

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, value: str | None) -> str | None:
        if value is not None and (value.count(":") != 1 or not all(value.split(":"))):
            raise ValueError(f"factory {value!r} must look like 'package.module:function'")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.model is None) == (self.factory is None):
            raise ValueError("give exactly one of 'model' (a built-in) or 'factory' (package.module:function)")
        return self

    def describe(self) -> str:
        return self.model or self.factory or "?"

    def build(self, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        """Build the model; its forward is adapted to return a logits tensor."""
        if self.model is not None:
            net = build_model(self.model, num_classes, input_shape, **self.kwargs)
        else:
            import inspect

            fn = resolve_factory(self.factory or "")
            params = inspect.signature(fn).parameters
            extra = {k: v for k, v in (("num_classes", num_classes), ("input_shape", tuple(input_shape)))
                     if k in params and k not in self.kwargs}
            net = fn(**self.kwargs, **extra)
            if not isinstance(net, nn.Module):
                from edgekd.errors import ModelError

                raise ModelError(f"factory {self.factory!r} returned {type(net).__name__}, not a torch.nn.Module")
        return adapt(net, torch.zeros(2, *input_shape))
