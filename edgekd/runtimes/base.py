"""One interface for every inference runtime (PyTorch eager, ONNX Runtime, ORT Mobile, ExecuTorch).

The benchmark and the parity checks use only this interface. A runtime module registers
itself by the artifact kind it runs; see ``edgekd.runtimes.registry``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np


class LoadedModel(ABC):
    """A model loaded into one runtime, with a fixed thread count."""

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run one float32 batch (N, ...) and return logits (N, classes) as float32."""


class Runtime(ABC):
    """A runtime: says if it is installed, loads artifacts, sets threads."""

    #: short stable id used in recipes and reports: "torch", "onnxruntime", "ort-mobile", "executorch"
    name: ClassVar[str]
    #: the pip extra that installs it, named in the one-line "not installed" message
    extra: ClassVar[str | None] = None

    @classmethod
    @abstractmethod
    def available(cls) -> bool:
        """True when the runtime's package imports."""

    @abstractmethod
    def load(self, artifact: Path, threads: int) -> LoadedModel:
        """Load an artifact file; raise ``edgekd.errors.StageError`` with a clear message on a bad file."""
