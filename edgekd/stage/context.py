"""What stages share: the recipe, the data, the teacher, the current student, artifacts and the ledger.

Everything a later stage (or a resumed run) needs is either in the run directory or in the
``manifest.json`` entries built from these objects, so it can be rebuilt after a restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
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
    #: the recipe position of the stage that wrote the row ("teacher", "2-prune"); the runner fills it,
    #: so a recipe that prunes twice tells its two "prune" rows apart (None in manifests before it)
    key: str | None = None


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
    #: JSON-able data for the report (prune channel tables, quantize candidates, ...) that a stage files
    #: under its own name: ``ctx.report_data["prune"] = ...``. Inside a run this holds only the running
    #: stage's data: the runner empties it when a stage starts and files what the stage put here under
    #: the stage's position (``stage_report_entries``), so two "prune" stages never share an entry.
    report_data: dict[str, Any] = field(default_factory=dict)
    #: files ``run`` wrote for the current stage; the runner hashes them into the manifest
    stage_outputs: list[Path] = field(default_factory=list)
    #: the recipe position of the stage the runner is running ("3-distill": index in ``recipe.stages``
    #: and recipe key, as in the manifest); None when a stage is called outside a run (tests, tools)
    stage_key: str | None = None
    #: that stage's name ("distill"): what it passes to ``stage_dir`` and files ``report_data`` under
    stage_name: str | None = None
    #: the run's console: stages print through it (and hand it to ``fit``), so ``edgekd.compress(quiet=True)``
    #: silences every line of the run, not just the runner's
    console: Console = field(default_factory=lambda: Console(stderr=True))

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

    def enter_stage(self, key: str, name: str) -> None:
        """The runner starts the stage at recipe position ``key`` (e.g. "3-distill") named ``name``: its
        ``stage_dir``, ``report_data`` and ``stage_outputs`` become that position's own, empty."""
        self.stage_key, self.stage_name = key, name
        self.report_data = {}
        self.stage_outputs = []

    def leave_stage(self) -> None:
        """Back to no running stage (``stage_dir(name)`` is ``stages/<name>`` again)."""
        self.stage_key = self.stage_name = None
        self.report_data = {}

    def stage_report_entries(self) -> dict[str, Any]:
        """What the running stage filed in ``report_data``, keyed by its position: the entry under the
        stage's own name as ``"<stage_key>"`` (``{"3-distill": {...}}``), any other name it filed as
        ``"<stage_key>/<name>"`` (``"3-distill/transfer"``). Outside a run: ``report_data`` as it is."""
        if self.stage_key is None:
            return dict(self.report_data)
        return {self.stage_key if name == self.stage_name else f"{self.stage_key}/{name}": data
                for name, data in self.report_data.items()}

    def stage_dir(self, name: str) -> Path:
        """A per-stage working directory inside the run (checkpoints, logs), created on first use.

        Inside a run the directory belongs to the running stage's recipe position: the stage named
        ``name`` at position "3-distill" works in ``stages/3-distill/``, so a recipe with two distill
        stages keeps two sets of checkpoints and a resumed second one never reads the first's. Another
        name asked for by the same stage gets a folder inside it (``stages/3-distill/<name>/``).
        Outside a run (a stage called directly) it is ``stages/<name>/``.
        """
        root = self.run_dir.path / "stages"
        if self.stage_key is None:
            path = root / name
        elif name == self.stage_name:
            path = root / self.stage_key
        else:
            path = root / self.stage_key / name
        path.mkdir(parents=True, exist_ok=True)
        return path
