"""PyTorch eager on CPU: the reference every exported artifact is compared with.

Threads: ``torch.set_num_threads`` sets the size of PyTorch's intra-op pool, which is
process-wide; a loaded model sets it before each run (when it differs) so teacher and student
loaded with the same count keep it, and a later model with another count takes over.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from edgekd.errors import EdgekdError, ModelError, StageError
from edgekd.models.adapter import logits_of
from edgekd.runtimes.base import LoadedModel, Runtime


class TorchLoadedModel(LoadedModel):
    runtime = "torch"

    def __init__(self, model: nn.Module, threads: int) -> None:
        self.model = model
        self.threads = threads

    def run(self, batch: np.ndarray) -> np.ndarray:
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        with torch.inference_mode():
            out = logits_of(self.model(x))
        return out.float().numpy()


class TorchRuntime(Runtime):
    name: ClassVar[str] = "torch"

    def load(self, artifact: Path, threads: int) -> TorchLoadedModel:
        """Load an edgekd portable checkpoint (``.pt``, pruned or not) onto the CPU."""
        from edgekd.models.portable import load_portable

        artifact = self._check_file(artifact, threads)
        try:
            model, _meta = load_portable(artifact)
        except ModelError:
            raise  # the file itself is bad or untrusted: bad input (exit 2), not a failed stage
        except EdgekdError as exc:
            raise StageError(f"torch cannot load {artifact}: {exc.message}", hint=exc.hint) from exc
        return TorchLoadedModel(model.cpu().eval(), threads)

    @classmethod
    def from_module(cls, model: nn.Module, threads: int, *, copy_model: bool = True) -> TorchLoadedModel:
        """Wrap an in-memory model (a CPU copy in eval mode, so the caller's model is untouched)."""
        if threads < 1:
            raise StageError(f"torch: thread count must be at least 1, got {threads}")
        model = copy.deepcopy(model) if copy_model else model
        return TorchLoadedModel(model.cpu().eval(), threads)
