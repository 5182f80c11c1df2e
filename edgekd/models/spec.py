"""How a recipe names a model: a built-in by name, or a user factory, with keyword arguments."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from edgekd.config_base import StrictModel
from edgekd.errors import EdgekdError, ModelError
from edgekd.models.adapter import adapt
from edgekd.models.registry import BUILTIN_MODELS, build_model, resolve_factory, unknown_name_hint


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
        """Build the model; its forward is adapted to return a logits tensor.

        Raises ``ModelError`` (exit 2) for anything the builder raises: a recipe's kwargs are user
        input, so ``width: -1``, ``width: 1.5`` or an unknown keyword is a bad value, named with the
        builder's own message, never a traceback.
        """
        shown = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items()) or "no kwargs"
        hint = "check the model's kwargs in the recipe (positive integer widths, known keyword names)"
        try:
            net = self._construct(num_classes, input_shape)
        except EdgekdError:
            raise
        except (Exception, MemoryError) as exc:  # noqa: BLE001 - any builder failure is bad user input
            raise ModelError(f"building {self.describe()} ({shown}) failed: {_first_line(exc)}", hint=hint) from exc
        if not isinstance(net, nn.Module):
            raise ModelError(f"factory {self.factory!r} returned {type(net).__name__}, not a torch.nn.Module")
        example = torch.zeros(2, *input_shape)
        try:
            return adapt(net, example)
        except EdgekdError:
            raise
        except (Exception, MemoryError) as exc:  # noqa: BLE001 - the built model cannot run its input
            raise ModelError(f"{self.describe()} ({shown}) built, but fails on a batch shaped "
                             f"{tuple(example.shape)}: {_first_line(exc)}", hint=hint) from exc

    def _construct(self, num_classes: int, input_shape: tuple[int, ...]) -> object:
        if self.model is not None:
            return build_model(self.model, num_classes, input_shape, **self.kwargs)
        import inspect

        fn = resolve_factory(self.factory or "")
        params = inspect.signature(fn).parameters
        extra = {k: v for k, v in (("num_classes", num_classes), ("input_shape", tuple(input_shape)))
                 if k in params and k not in self.kwargs}
        return fn(**self.kwargs, **extra)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
