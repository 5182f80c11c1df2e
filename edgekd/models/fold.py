"""Fold weight normalisation into plain weights, so pruning and export see ordinary layers.

``torch.nn.utils.weight_norm`` (the hook form most TCN/WaveNet code uses) and
``torch.nn.utils.parametrizations.weight_norm`` store a layer's weight as a direction ``v`` and a
magnitude ``g`` and recompute ``w = g * v / ||v||`` before every call. That extra graph breaks
torch-pruning (it prunes ``weight`` but the hook rebuilds it from unpruned ``g``/``v``) and keeps
6 of 7 convolutions of a weight-normed TCN out of ExecuTorch's XNNPACK delegate. Once training
is over the normalisation only reparametrises a fixed weight, so it is folded: ``w`` is computed
once and stored as the layer's plain ``weight`` (the same computation the hook runs, so outputs
are bit-identical in eval mode).

A folded model records the fold in ``TRANSFORMS_ATTR`` on its root module; the portable
checkpoint (``edgekd.models.portable``) stores that list and replays it on the freshly built
architecture before loading the weights.
"""

from __future__ import annotations

import warnings

from torch import nn
from torch.nn.utils import parametrize

#: name of the fold in a portable checkpoint's ``transforms`` list
FOLD_WEIGHT_NORM = "fold_weight_norm"
#: attribute on a model's root module listing the transforms applied to it, in order
TRANSFORMS_ATTR = "_edgekd_transforms"


def _hook_weight_norm_names(module: nn.Module) -> list[str]:
    """Parameter names normalised by the hook form (``torch.nn.utils.weight_norm``)."""
    from torch.nn.utils.weight_norm import WeightNorm

    return [hook.name for hook in module._forward_pre_hooks.values() if isinstance(hook, WeightNorm)]


def _is_weight_norm_parametrization(parametrization: nn.Module) -> bool:
    return type(parametrization).__name__ == "_WeightNorm"


def fold_weight_norm(model: nn.Module) -> list[str]:
    """Replace every weight normalisation in ``model`` (both forms) by the plain weight it
    computes, in place. Returns the names of the modules folded (``name`` or ``name.param``
    when a parameter other than ``weight`` was normalised); records the fold on ``model``.

    Other parametrizations (orthogonal, spectral norm, ...) are left as they are.
    """
    folded: list[str] = []
    for name, module in model.named_modules():
        for param in _hook_weight_norm_names(module):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the hook form's deprecation notice
                nn.utils.remove_weight_norm(module, param)
            folded.append(name if param == "weight" else f"{name}.{param}")
        if parametrize.is_parametrized(module):
            for param, plist in list(module.parametrizations.items()):
                if len(plist) == 1 and _is_weight_norm_parametrization(plist[0]):
                    # the parametrized class is shared with every deepcopy of this module, and removing
                    # a parametrization deletes its property from that class: give this module its own
                    # copy first, or folding a copy would break the original
                    cls = type(module)
                    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
                    parametrize.remove_parametrizations(module, param, leave_parametrized=True)
                    _drop_compat_hooks(module)
                    folded.append(name if param == "weight" else f"{name}.{param}")
    if folded:
        record_transform(model, FOLD_WEIGHT_NORM)
    return folded


def _drop_compat_hooks(module: nn.Module) -> None:
    """The parametrization form leaves a load-state-dict hook (a local function: it cannot be
    pickled into export's child process) that only renames old ``weight_g``/``weight_v`` keys."""
    hooks = module._load_state_dict_pre_hooks
    for key in [k for k, h in hooks.items()
                if getattr(getattr(h, "hook", h), "__name__", "") == "_weight_norm_compat_hook"]:
        del hooks[key]


def record_transform(model: nn.Module, name: str) -> None:
    """Note on ``model`` that transform ``name`` was applied (once)."""
    done = list(getattr(model, TRANSFORMS_ATTR, []))
    if name not in done:
        done.append(name)
    model.__dict__[TRANSFORMS_ATTR] = done


def applied_transforms(model: nn.Module) -> list[str]:
    """The transforms recorded on ``model`` (empty for a model as its architecture builds it)."""
    return list(getattr(model, TRANSFORMS_ATTR, []))


#: every transform a portable checkpoint may ask for, by name; nothing else is ever run
TRANSFORMS = {FOLD_WEIGHT_NORM: fold_weight_norm}
