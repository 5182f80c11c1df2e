"""A checkpoint format for pruned models that loads with ``weights_only=True``.

torch-pruning changes layer shapes in place, so a pruned model no longer matches its
architecture's constructor and ``tp.state_dict`` pickles module classes. Instead we store the
model *spec* (built-in name or factory + kwargs), every module's shape attributes and the state
dict — only tensors and plain containers — and rebuild: construct the original architecture,
set the recorded attributes, resize parameters to the recorded shapes, load the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekd.errors import ModelError
from edgekd.fileio import atomic_torch_save
from edgekd.models.checkpoint import read_checkpoint
from edgekd.models.spec import ModelSpec

FORMAT = "edgekd.portable/1"

# Attributes that pruning changes and forward() reads (conv/linear/norm/attention/embedding).
SHAPE_ATTRIBUTES = (
    "in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
    "normalized_shape", "num_groups", "num_channels", "embed_dim", "num_heads", "head_dim",
    "kdim", "vdim", "_qkv_same_embed_dim", "num_parameters", "num_embeddings", "embedding_dim",
)


def _structure(model: nn.Module) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        attrs = {a: module.__dict__[a] for a in SHAPE_ATTRIBUTES
                 if a in module.__dict__ and isinstance(module.__dict__[a], (int, bool, tuple, list))}
        if attrs:
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()}
    return out


def _swaps(model: nn.Module) -> dict[str, str]:
    """Modules a stage replaced by an edgekd class (e.g. head-prunable attention): name -> class.

    Only classes under ``edgekd.`` that offer ``from_module(original)`` are recorded, so loading
    never imports code a checkpoint names from elsewhere.
    """
    return {name: f"{type(m).__module__}:{type(m).__qualname__}" for name, m in model.named_modules()
            if name and type(m).__module__.startswith("edgekd.") and hasattr(type(m), "from_module")}


def _apply_swaps(model: nn.Module, swaps: dict[str, str]) -> None:
    import importlib

    for name, qualified in swaps.items():
        module_name, _, cls_name = qualified.partition(":")
        if not module_name.startswith("edgekd."):
            raise ModelError(f"portable checkpoint asks for module class {qualified!r}, outside edgekd")
        cls = getattr(importlib.import_module(module_name), cls_name)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        original = getattr(parent, attr, None)
        if original is None:
            raise ModelError(f"portable checkpoint names module {name!r}, which the architecture lacks")
        if not isinstance(original, cls):
            setattr(parent, attr, cls.from_module(original))


def save_portable(model: nn.Module, path: Path, *, spec: ModelSpec, num_classes: int,
                  input_shape: tuple[int, ...], extra: dict[str, Any] | None = None) -> None:
    payload = {
        "format": FORMAT,
        "spec": spec.model_dump(mode="json"),
        "num_classes": int(num_classes),
        "input_shape": [int(s) for s in input_shape],
        "swaps": _swaps(model),
        "structure": _structure(model),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    atomic_torch_save(payload, path)


def _apply_structure(model: nn.Module, structure: dict[str, dict[str, Any]]) -> None:
    modules = dict(model.named_modules())
    for name, attrs in structure.items():
        if name not in modules:
            raise ModelError(f"portable checkpoint names module {name!r}, which the architecture lacks")
        for key, value in attrs.items():
            setattr(modules[name], key, tuple(value) if isinstance(value, list) else value)


def _resize_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    for key, tensor in state.items():
        owner_name, _, attr = key.rpartition(".")
        owner = modules.get(owner_name)
        if owner is None:
            continue
        if attr in owner._parameters and owner._parameters[attr] is not None:
            if owner._parameters[attr].shape != tensor.shape:
                owner._parameters[attr] = nn.Parameter(torch.empty_like(tensor),
                                                       requires_grad=owner._parameters[attr].requires_grad)
        elif attr in owner._buffers and owner._buffers[attr] is not None:
            if owner._buffers[attr].shape != tensor.shape:
                owner._buffers[attr] = torch.empty_like(tensor)


def load_portable(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model; returns (model in eval mode, meta with spec/num_classes/input_shape/extra)."""
    payload = read_checkpoint(Path(path))
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelError(f"{path} is not an edgekd portable model (expected format {FORMAT})",
                         hint="plain state dicts load through a recipe's teacher.checkpoint instead")
    spec = ModelSpec.model_validate(payload["spec"])
    input_shape = tuple(payload["input_shape"])
    model = spec.build(payload["num_classes"], input_shape)
    _apply_swaps(model, payload.get("swaps", {}))
    _apply_structure(model, payload["structure"])
    _resize_tensors(model, payload["state_dict"])
    from edgekd.models.checkpoint import load_state_dict_checked

    load_state_dict_checked(model, payload["state_dict"], str(path))
    meta = {k: payload[k] for k in ("spec", "num_classes", "input_shape", "extra")}
    meta["input_shape"] = input_shape
    return model.eval(), meta
