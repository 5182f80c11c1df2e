"""The quickstart's teacher and pruned student, built as ``recipes/quickstart.yaml`` builds them.

Shared by the benchmark scripts so they cannot drift from the recipe: its data (image size),
teacher architecture and prune stage (whatever target it names, reached with ``reach_target``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from edgekd.data import load_data
from edgekd.data.bundle import DataBundle
from edgekd.prune.targets import PruneEnv, reach_target
from edgekd.recipe.load import load_recipe

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def quickstart_models(train_teacher: Callable[[nn.Module, DataBundle], None] | None = None
                      ) -> tuple[nn.Module, nn.Module, DataBundle]:
    """(teacher, pruned student, data); ``train_teacher`` runs before pruning (None: untrained)."""
    recipe = load_recipe(QUICKSTART).recipe
    data = load_data(recipe.data, seed=recipe.seed)
    torch.manual_seed(recipe.seed)
    teacher = recipe.teacher.build(data.num_classes, data.input_shape)
    if train_teacher is not None:
        train_teacher(teacher, data)
    prune_cfg = next(entry.prune for entry in recipe.stages if entry.prune is not None).model_copy(
        update={"probe": None})
    student = reach_target(copy.deepcopy(teacher), PruneEnv(
        config=prune_cfg, samples=data.calibration_batch(64), teacher=teacher,
        gradient_batches=lambda: data.train_loader(64))).model
    return teacher, student, data
