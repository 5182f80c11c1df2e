"""One interface for every inference runtime (PyTorch eager, ONNX Runtime, ORT Mobile, ExecuTorch).

The benchmark and the parity checks use only this interface. Each runtime module defines one
``Runtime`` subclass; its entry in ``edgekd.runtimes.registry`` maps the recipe name to it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from edgekd.errors import ArtifactError, RuntimeUnavailableError, StageError

if TYPE_CHECKING:
    from edgekd.runtimes.registry import RuntimeEntry


class LoadedModel(ABC):
    """A model loaded into one runtime, with a fixed thread count."""

    #: the runtime's ``name`` and the thread count the model was loaded with
    runtime: str = ""
    threads: int = 1
    #: the largest batch one ``run`` call accepts (None: any); ExecuTorch plans memory for a bound
    max_batch: int | None = None

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run one float32 batch (N, ...) and return logits (N, classes) as float32."""

    def run_in_batches(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Logits for many samples, ``batch_size`` (capped at ``max_batch``) at a time."""
        step = max(1, min(batch_size, self.max_batch or batch_size))
        parts = [self.run(np.ascontiguousarray(x[i:i + step], dtype=np.float32)) for i in range(0, len(x), step)]
        return np.concatenate(parts, axis=0)


class Runtime(ABC):
    """A runtime: loads artifacts of its format and sets threads.

    Everything else about it (format, suffix, library, pip extra, plot marker, parity role) is
    declared by its ``RuntimeEntry`` in ``edgekd.runtimes.registry``, found by ``name``.
    """

    #: short stable id used in recipes and reports; the key of its ``RuntimeEntry``
    name: ClassVar[str]

    @property
    def entry(self) -> RuntimeEntry:
        from edgekd.runtimes.registry import RUNTIMES

        return RUNTIMES[self.name]

    @property
    def fmt(self) -> str:
        """The artifact format it runs: "torch" (portable .pt), "onnx", "ort", "pte"."""
        return self.entry.fmt

    @classmethod
    def available(cls) -> bool:
        """True when the runtime's package is installed (override to check more, never to import it)."""
        from edgekd.runtimes.registry import RUNTIMES

        return RUNTIMES[cls.name].package_installed()

    @abstractmethod
    def load(self, artifact: Path, threads: int) -> LoadedModel:
        """Load an artifact file; raise ``edgekd.errors.ArtifactError`` (exit 2) naming a bad file."""

    # -- helpers shared by the runtime modules ---------------------------------
    def _check_file(self, artifact: Path, threads: int) -> Path:
        """Refuse a missing package, a thread count below 1 and a missing file, each in one line."""
        if not self.available():
            raise RuntimeUnavailableError(self.entry.missing_hint)
        artifact = Path(artifact)
        if threads < 1:
            raise StageError(f"{self.name}: thread count must be at least 1, got {threads}")
        if not artifact.is_file():
            raise ArtifactError(f"{self.name}: artifact {artifact} does not exist",
                             hint=f"export one first: edgekd export MODEL --to {self.fmt}")
        return artifact

    def _bad_artifact(self, artifact: Path, exc: BaseException | str) -> ArtifactError:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return ArtifactError(f"{self.name} cannot load {artifact} as a .{self.fmt} model: {first}",
                          hint="the file is truncated, corrupt or of another format; export it again")
