"""A checkpoint format for pruned models that loads with ``weights_only=True``.

torch-pruning changes layer shapes in place, so a pruned model no longer matches its
architecture's constructor and ``tp.state_dict`` pickles module classes. Instead we store the
model *spec* (built-in name or factory + kwargs), every module's shape attributes and the state
dict — only tensors and plain containers — and rebuild: construct the original architecture,
set the recorded attributes, resize parameters to the recorded shapes, load the weights.

A checkpoint is data: it never chooses code to run. A built-in spec rebuilds edgekd's own
architecture; a factory spec is called only when the caller trusts that factory by name (the
running recipe names it, or the user passed ``--factory`` on the command line), and a module swap
is taken only from edgekd's fixed list of swappable classes, and a transform (weight-norm folding)
only from edgekd's fixed list of transforms (``edgekd.models.fold.TRANSFORMS``), replayed on the
built architecture before its weights are loaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekd.errors import ModelError
from edgekd.fileio import atomic_torch_save
from edgekd.models.checkpoint import read_checkpoint
from edgekd.models.fold import TRANSFORMS, applied_transforms
from edgekd.models.spec import ModelSpec

FORMAT = "edgekd.portable/1"

#: every module class a stage may swap into a model, by "module:qualname"; nothing else is imported
SWAPPABLE_MODULES: dict[str, tuple[str, str]] = {
    "edgekd.prune.attention:SplitHeadAttention": ("edgekd.prune.attention", "SplitHeadAttention"),
    # timm-style fused-qkv attention whose output width follows its heads (whole heads pruned)
    "edgekd.prune.attention:FusedHeadAttention": ("edgekd.prune.attention", "FusedHeadAttention"),
    # low-rank factorized layers (edgekd.lowrank): rebuilt at full rank, then resized to the recorded rank
    "edgekd.lowrank.modules:LowRankLinear": ("edgekd.lowrank.modules", "LowRankLinear"),
    "edgekd.lowrank.modules:ChannelLowRankConv": ("edgekd.lowrank.modules", "ChannelLowRankConv"),
    "edgekd.lowrank.modules:SpatialLowRankConv2d": ("edgekd.lowrank.modules", "SpatialLowRankConv2d"),
}

#: factories the current command trusts a checkpoint to name (set by ``trusted_factories``)
_TRUSTED_FACTORIES: ContextVar[frozenset[str]] = ContextVar("edgekd_trusted_factories", default=frozenset())


@contextmanager
def trusted_factories(factories: Iterable[str | None]) -> Iterator[frozenset[str]]:
    """Within the block, portable checkpoints whose spec names one of ``factories`` may be rebuilt.

    The runner trusts the factories its recipe names; ``edgekd export/benchmark`` trust those given
    with ``--factory``. Nested blocks add to the outer set.
    """
    names = _TRUSTED_FACTORIES.get() | {f for f in factories if f}
    token = _TRUSTED_FACTORIES.set(names)
    try:
        yield names
    finally:
        _TRUSTED_FACTORIES.reset(token)


def trusted_now() -> frozenset[str]:
    """The factories trusted at this point (the enclosing ``trusted_factories`` blocks): what a child process
    that loads this command's checkpoints must be told to trust, since a context variable does not cross."""
    return _TRUSTED_FACTORIES.get()

# Attributes that pruning changes and forward() reads (conv/linear/norm/attention/embedding).
SHAPE_ATTRIBUTES = (
    "in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
    "normalized_shape", "num_groups", "num_channels", "embed_dim", "num_heads", "head_dim",
    "kdim", "vdim", "_qkv_same_embed_dim", "num_parameters", "num_embeddings", "embedding_dim",
    # Hugging Face attention (ViTSelfAttention and kin) after whole heads are pruned
    "num_attention_heads", "attention_head_size", "all_head_size",
    # Hugging Face LeViT attention after whole heads are pruned (edgekd.prune.packed_heads)
    "out_dim_keys_values", "out_dim_projection",
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


def _apply_swaps(model: nn.Module, swaps: dict[str, str], source: Path) -> None:
    import importlib

    if not isinstance(swaps, dict):
        raise ModelError(f"{source}: portable checkpoint has a malformed 'swaps' entry")
    for name, qualified in swaps.items():
        if qualified not in SWAPPABLE_MODULES:
            raise ModelError(f"{source} asks to swap module {name!r} for class {qualified!r}, which is not one "
                             f"of edgekd's swappable modules ({', '.join(SWAPPABLE_MODULES)})",
                             hint="edgekd never imports a class a checkpoint names; re-export the model with edgekd")
        module_name, cls_name = SWAPPABLE_MODULES[qualified]
        cls = getattr(importlib.import_module(module_name), cls_name)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        original = getattr(parent, attr, None)
        if original is None:
            raise ModelError(f"portable checkpoint names module {name!r}, which the architecture lacks")
        if not isinstance(original, cls):
            setattr(parent, attr, cls.from_module(original))


def _apply_transforms(model: nn.Module, transforms: object, source: Path) -> None:
    """Replay the recorded transforms (e.g. weight-norm folding) on a freshly built model."""
    if not isinstance(transforms, list) or not all(isinstance(t, str) for t in transforms):
        raise ModelError(f"{source}: portable checkpoint has a malformed 'transforms' entry")
    for name in transforms:
        if name not in TRANSFORMS:
            raise ModelError(f"{source} asks for transform {name!r}, which is not one of edgekd's transforms "
                             f"({', '.join(TRANSFORMS)})",
                             hint="edgekd never runs code a checkpoint names; re-export the model with edgekd")
        TRANSFORMS[name](model)


def save_portable(model: nn.Module, path: Path, *, spec: ModelSpec, num_classes: int,
                  input_shape: tuple[int, ...], extra: dict[str, Any] | None = None) -> None:
    payload = {
        "format": FORMAT,
        "spec": spec.model_dump(mode="json"),
        "num_classes": int(num_classes),
        "input_shape": [int(s) for s in input_shape],
        "transforms": applied_transforms(model),
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


def check_factory_trusted(spec: ModelSpec, source: Path, trusted: Iterable[str] = ()) -> None:
    """Refuse a spec whose factory the caller has not named (``ModelError``, exit 2).

    ``trusted`` adds to the factories trusted by an enclosing ``trusted_factories`` block.
    """
    if spec.factory is None or spec.factory in _TRUSTED_FACTORIES.get() | set(trusted):
        return
    raise ModelError(
        f"{source} asks to rebuild its model by calling factory {spec.factory!r}; edgekd does not run code "
        "that a checkpoint file names",
        hint=f"if you trust this file and that code, name the factory yourself: --factory {spec.factory} "
             "(or use the recipe whose teacher or student names it)")


def load_portable(path: Path, *, factories: Iterable[str] = ()) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model; returns (model in eval mode, meta with spec/num_classes/input_shape/extra).

    ``factories``: user factories ("package.module:function") the caller trusts, beside those of an
    enclosing ``trusted_factories`` block. A checkpoint naming any other factory raises
    ``ModelError`` before anything is imported; so does one that is not an edgekd portable file.
    """
    path = Path(path)
    payload = read_checkpoint(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelError(f"{path} is not an edgekd portable model (expected format {FORMAT})",
                         hint="plain state dicts load through a recipe's teacher.checkpoint instead")
    try:
        spec = ModelSpec.model_validate(payload["spec"])
        input_shape = tuple(int(s) for s in payload["input_shape"])
        num_classes = int(payload["num_classes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: portable checkpoint has a malformed model spec: {exc}".splitlines()[0]) from exc
    check_factory_trusted(spec, path, factories)
    model = spec.build(num_classes, input_shape)
    _apply_transforms(model, payload.get("transforms", []), path)
    _apply_swaps(model, payload.get("swaps", {}), path)
    _apply_structure(model, payload["structure"])
    _resize_tensors(model, payload["state_dict"])
    from edgekd.models.checkpoint import load_state_dict_checked

    load_state_dict_checked(model, payload["state_dict"], str(path))
    meta = {k: payload[k] for k in ("spec", "num_classes", "input_shape", "extra")}
    meta["input_shape"] = input_shape
    return model.eval(), meta
