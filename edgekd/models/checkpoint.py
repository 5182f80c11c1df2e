"""Plain state-dict checkpoints (teachers, unpruned models), loaded with ``weights_only=True``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgekd.errors import ModelError
from edgekd.fileio import atomic_torch_save


def save_state_dict(model: nn.Module, path: Path) -> None:
    atomic_torch_save(model.state_dict(), path)


def read_checkpoint(path: Path) -> dict:
    """Load a checkpoint file without executing pickled code."""
    if not Path(path).is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise ModelError(f"cannot read checkpoint {path} with weights_only=True: {exc}".splitlines()[0],
                         hint="save a state dict (model.state_dict()), not a pickled model object") from exc


def _unwrap(state: dict) -> dict:
    # Accept the usual containers people save: {"state_dict": ...}, {"model": ...}
    for key in ("state_dict", "model_state_dict", "model"):
        if key in state and isinstance(state[key], dict):
            return state[key]
    return state


def load_state_dict_checked(model: nn.Module, state: dict, source: str) -> None:
    """Load ``state`` into ``model``; mismatches are reported by layer name and shape."""
    state = _unwrap(state)
    own = model.state_dict()
    # A user model wrapped in LogitsAdapter has keys prefixed "model."; accept either form.
    if own and all(k.startswith("model.") for k in own) and not any(k.startswith("model.") for k in state):
        state = {f"model.{k}": v for k, v in state.items()}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch:\n    " + "\n    ".join(wrong[:10]))
        if missing:
            parts.append(f"missing in checkpoint: {', '.join(missing[:10])}")
        if unexpected:
            parts.append(f"not in model: {', '.join(unexpected[:10])}")
        raise ModelError(f"checkpoint {source} does not fit the model:\n  " + "\n  ".join(parts),
                         hint="check the model name, its kwargs and num_classes in the recipe")
    model.load_state_dict(state)


def load_checkpoint(model: nn.Module, path: Path) -> None:
    load_state_dict_checked(model, read_checkpoint(path), str(path))
