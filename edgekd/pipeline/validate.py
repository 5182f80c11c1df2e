"""``edgekd validate``: everything that can be checked without training.

Beyond the schema: the data loads, the models build with the data's shape, a teacher
checkpoint fits, the student and teacher agree on classes, both keep the batch axis at
batches of 1, 2 and 3, and each stage's own ``check`` (layer names, shapes) passes on one
real batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import edgekd.pipeline.stages  # noqa: F401  (registers every stage)
from edgekd.data import load_data
from edgekd.errors import EdgekdError, RecipeError
from edgekd.models.adapter import check_batch_axis
from edgekd.models.checkpoint import load_checkpoint
from edgekd.pipeline.teacher import load_given_teacher
from edgekd.recipe.load import RecipeDocument
from edgekd.stage.base import stage_for
from edgekd.stage.context import ValidationContext
from edgekd.train.augment import augment_batch, augment_generator
from edgekd.train.config import TrainConfig


@dataclass
class ValidationSummary:
    dataset: str
    train_samples: int
    val_samples: int
    num_classes: int
    input_shape: tuple[int, ...]
    stages: list[str]
    #: the held-out split every reported figure and the gate read
    test_samples: int = 0


def _at(doc: RecipeDocument, key: str, exc: EdgekdError) -> RecipeError:
    return doc.error_at(key, exc.message, exc.hint)


def validate_document(doc: RecipeDocument, *, teacher: nn.Module | None = None,
                      datasets=None) -> ValidationSummary:
    """Check ``doc`` without training; raise an ``EdgekdError`` (a ``RecipeError`` at the key and line) at the
    first problem. ``teacher``/``datasets``: the trained module and in-memory splits of the Python API."""
    recipe = doc.recipe
    given = teacher
    try:
        data = load_data(recipe.data, recipe.seed, datasets)
    except EdgekdError as exc:
        raise _at(doc, "data", exc) from exc
    try:
        if given is not None:
            teacher = load_given_teacher(recipe, given, data.num_classes, data.input_shape)
        else:
            teacher = recipe.teacher.spec().build(data.num_classes, data.input_shape)
        if given is None and recipe.teacher.checkpoint is not None:
            load_checkpoint(teacher, recipe.teacher.checkpoint)
    except EdgekdError as exc:
        raise _at(doc, "teacher", exc) from exc
    student_spec = recipe.student.spec()
    try:
        student = student_spec.build(data.num_classes, data.input_shape) if student_spec else teacher
    except EdgekdError as exc:
        raise _at(doc, "student", exc) from exc
    example = data.example_batch(2)
    with torch.no_grad():
        t_out, s_out = teacher.eval()(example), student.eval()(example)
    if t_out.shape[-1] != s_out.shape[-1]:
        raise doc.error_at("student", f"the student predicts {s_out.shape[-1]} classes but the teacher "
                           f"{t_out.shape[-1]}", hint="give the student num_classes equal to the teacher's")
    # every batch size must give (N, classes): a phone runs batch 1, and a model that drops the batch
    # axis there (a bare .squeeze()) exports to files that fail or disagree at batch 1
    for role, model in (("teacher", teacher), ("student", student)):
        if role == "student" and student is teacher:
            continue
        try:
            check_batch_axis(model, example)
        except EdgekdError as exc:
            raise _at(doc, role, exc) from exc
    _check_augment(doc, "teacher.train", recipe.teacher.train, example)
    for i, entry in enumerate(recipe.stages):
        _check_augment(doc, f"stages.{i}.{entry.key}", entry.config, example)
    ctx = ValidationContext(recipe=recipe, teacher=teacher, student=student, example_batch=example,
                            num_classes=data.num_classes, train_samples=len(data.train))
    names = []
    for i, entry in enumerate(recipe.stages):
        names.append(entry.key)
        try:
            stage_for(entry.config).check(ctx)
        except RecipeError as exc:
            key = f"stages.{i}.{exc.key}" if exc.key else f"stages.{i}.{entry.key}"
            if exc.key and not exc.key.startswith(entry.key):
                key = f"stages.{i}.{entry.key}.{exc.key}"
            raise doc.error_at(key, _strip_location(exc), exc.hint) from exc
        except EdgekdError as exc:
            raise _at(doc, f"stages.{i}.{entry.key}", exc) from exc
    if recipe.benchmark is not None:
        stage_for(recipe.benchmark).check(ctx)
    return ValidationSummary(dataset=recipe.data.dataset, train_samples=len(data.train), val_samples=len(data.val),
                             num_classes=data.num_classes, input_shape=data.input_shape, stages=names,
                             test_samples=len(data.test) if data.test is not None else 0)


def _check_augment(doc: RecipeDocument, key: str, config: object, example: torch.Tensor) -> None:
    """A training block's ``augment`` must suit the data (hflip needs images): try it on one batch."""
    augment = config.active_augment if isinstance(config, TrainConfig) else None
    if augment is None:
        return
    try:
        augment_batch(example, augment, augment_generator(0, 0, 0, example.device))
    except EdgekdError as exc:
        raise doc.error_at(f"{key}.augment", exc.message, exc.hint) from exc


def _strip_location(exc: RecipeError) -> str:
    """A stage raised RecipeError without file/line; drop its own 'key: ' prefix before re-raising."""
    prefix = f"{exc.key}: " if exc.key else ""
    return exc.message.removeprefix(prefix)
