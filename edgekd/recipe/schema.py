"""The recipe: one typed document that says what to compress and how.

Sections: ``data`` (a typed source), ``teacher`` (a model, and a checkpoint or a ``train`` block),
``student`` (a copy of the teacher or another architecture), ``stages`` (ordered), and the
``benchmark`` and ``gate`` run after them. Unknown keys are errors everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from edgekd.bench.config import BenchmarkConfig
from edgekd.config_base import StrictModel
from edgekd.data.registry import DataConfig
from edgekd.models.spec import ModelSpec
from edgekd.recipe.stages import StageEntry
from edgekd.report.config import GateConfig
from edgekd.train.config import TrainConfig

#: what the data decides, never a model keyword argument
_FROM_DATA = ("num_classes", "input_shape")


def _refuse_data_kwargs(kwargs: dict) -> dict:
    given = [k for k in _FROM_DATA if k in kwargs]
    if given:
        raise ValueError(f"edgekd passes {' and '.join(_FROM_DATA)} from the data to every builder; remove "
                         f"{given[0]!r} from kwargs (the data's own classes and sample shape are used)")
    return kwargs


class TeacherConfig(ModelSpec):
    """The original model: loaded from a state-dict checkpoint, or trained by the ``train`` block."""

    checkpoint: Path | None = Field(None, description="state dict file, loaded with weights_only=True")
    train: TrainConfig | None = Field(None, description="train the teacher on the recipe's data first")

    @model_validator(mode="after")
    def _weights_source(self, info: ValidationInfo) -> TeacherConfig:
        # edgekd.compress(teacher=module) brings the trained weights itself (validation context
        # ``{"teacher_given": True}``); the section then only names the architecture
        if (info.context or {}).get("teacher_given"):
            if self.checkpoint is not None or self.train is not None:
                raise ValueError("a teacher module was passed, so the recipe's teacher names only its architecture; "
                                 "remove 'checkpoint' and 'train'")
            return self
        if self.checkpoint is None and self.train is None:
            raise ValueError("the teacher needs trained weights: give 'checkpoint' (a state dict) or a 'train' block")
        if self.checkpoint is not None and self.train is not None:
            raise ValueError("give either 'checkpoint' or 'train', not both")
        return self

    _kwargs_from_data = field_validator("kwargs")(classmethod(lambda cls, v: _refuse_data_kwargs(v)))

    def spec(self) -> ModelSpec:
        """The teacher's architecture alone (model or factory and kwargs), without its weights' source."""
        return ModelSpec(model=self.model, factory=self.factory, kwargs=self.kwargs)


class StudentConfig(StrictModel):
    """``{from: teacher}`` copies the teacher (then prune it); or name another architecture."""

    from_: Literal["teacher"] | None = Field(None, alias="from", description="'teacher': start from a copy")
    model: str | None = None
    factory: str | None = None
    kwargs: dict = Field(default_factory=dict)

    model_config = StrictModel.model_config | {"populate_by_name": True}

    @model_validator(mode="after")
    def _one_source(self) -> StudentConfig:
        if (self.from_ is None) == (self.model is None and self.factory is None):
            raise ValueError("give either 'from: teacher' or a 'model'/'factory' for the student")
        if self.from_ is None:  # the same rules as the teacher's model/factory, checked now, not at build time
            try:
                self.spec()
            except ValidationError as exc:
                raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return self

    _kwargs_from_data = field_validator("kwargs")(classmethod(lambda cls, v: _refuse_data_kwargs(v)))

    def spec(self) -> ModelSpec | None:
        """The student's own architecture, or None when it is a copy of the teacher."""
        if self.from_ is not None:
            return None
        return ModelSpec(model=self.model, factory=self.factory, kwargs=self.kwargs)


class Recipe(StrictModel):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100,
                      description="run name (a folder name, at most 100 characters)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds every random generator (numpy takes 32 bits)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks CUDA when available")
    data: DataConfig
    teacher: TeacherConfig
    student: StudentConfig = Field(default_factory=lambda: StudentConfig(from_="teacher"))
    stages: list[StageEntry] = Field(default_factory=list, description="run in order")
    benchmark: BenchmarkConfig | None = Field(None, description="teacher vs student on each runtime")
    gate: GateConfig | None = Field(None, description="fail the run (exit 3) past this accuracy drop")

    def student_spec(self) -> ModelSpec:
        """The student's architecture: its own, or the teacher's when it starts as a copy of the teacher."""
        return self.student.spec() or self.teacher.spec()
