"""Built-in architectures, user factories, checkpoints and the portable (pruned) model format."""

from edgekd.models.adapter import LogitsAdapter, logits_of
from edgekd.models.registry import BUILTIN_MODELS, build_model, resolve_factory
from edgekd.models.spec import ModelSpec

__all__ = ["BUILTIN_MODELS", "LogitsAdapter", "ModelSpec", "build_model", "logits_of", "resolve_factory"]
