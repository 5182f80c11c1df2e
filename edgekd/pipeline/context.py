"""What stages share: the recipe, the data, the teacher, the current student, artifacts and the ledger.

Everything a later stage (or a resumed run) needs is either in the run directory or in the
``manifest.json`` entries built from these objects, so it can be rebuilt after a restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from edgekd.data.bundle import DataBundle
    from edgekd.pipeline.rundir import RunDir
    from edgekd.recipe.schema import Recipe


@dataclass
class Artifact:
    """A file a stage produced for deployment (an .onnx, .ort, .pte, or a torch checkpoint).

    ``role`` is "teacher" or "student"; ``fmt`` the file kind ("torch", "onnx", "ort", "pte");
    ``precision`` "fp32" or "int8". ``info`` holds JSON-able facts (parity numbers, node counts).
    """

    role: str
    fmt: str
    path: Path
    precision: str = "fp32"
    status: str = "ok"  # "ok" or "failed"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.role}:{self.fmt}:{self.precision}"

    def to_json(self, root: Path) -> dict[str, Any]:
        rel = self.path.relative_to(root) if self.path.is_relative_to(root) else self.path
        return {"role": self.role, "fmt": self.fmt, "path": str(rel), "precision": self.precision,
                "status": self.status, "info": self.info}

    @classmethod
    def from_json(cls, data: dict[str, Any], root: Path) -> Artifact:
        path = Path(data["path"])
        return cls(role=data["role"], fmt=data["fmt"], path=path if path.is_absolute() else root / path,
                   precision=data["precision"], status=data["status"], info=dict(data["info"]))


@dataclass
class LedgerRow:
    """The student's state after one stage: what the report's stage ledger shows.

    ``val_accuracy`` (top-1 %, the validation split) is what the stage's decisions saw;
    ``test_accuracy`` (top-1 %, the test split, which no decision reads) is what the report quotes.
    """

    stage: str
    params: int | None = None
    macs: int | None = None
    val_accuracy: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    test_accuracy: float | None = None


@dataclass
class ValidationContext:
    """What ``Stage.check`` gets: the recipe, untrained models and a tiny real batch."""

    recipe: Recipe
    teacher: nn.Module
    student: nn.Module
    example_batch: torch.Tensor
    num_classes: int
    #: samples in the training split (calibration and other sample counts are checked against it)
    train_samples: int | None = None


@dataclass
class RunContext:
    recipe: Recipe
    run_dir: RunDir
    data: DataBundle
    device: torch.device
    teacher: nn.Module
    student: nn.Module
    #: True when ``--resume`` was given: a stage may continue its own checkpoints
    resume: bool = False
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    ledger: list[LedgerRow] = field(default_factory=list)
    #: per-stage JSON-able data for the report (prune channel tables, quantize candidates, ...)
    report_data: dict[str, Any] = field(default_factory=dict)
    #: files ``run`` wrote for the current stage; the runner hashes them into the manifest
    stage_outputs: list[Path] = field(default_factory=list)

    def add_artifact(self, artifact: Artifact) -> None:
        self.artifacts[artifact.key] = artifact
        self.stage_outputs.append(artifact.path)

    def artifact(self, role: str, fmt: str, precision: str = "fp32") -> Artifact | None:
        return self.artifacts.get(f"{role}:{fmt}:{precision}")

    @property
    def student_from_weights(self) -> bool:
        """Whether the student holds trained weights: a copy of the teacher (pruned or not), or a student
        an earlier stage already trained. Recovery training then uses fine-tuning defaults."""
        trained = any(row.stage in ("distill", "finetune") for row in self.ledger)
        return self.recipe.student.spec() is None or trained

    def stage_dir(self, name: str) -> Path:
        """A per-stage working directory inside the run (checkpoints, logs)."""
        path = self.run_dir.path / "stages" / name
        path.mkdir(parents=True, exist_ok=True)
        return path
