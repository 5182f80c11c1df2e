"""The teacher: built from the recipe, then loaded from its checkpoint or trained on the data.

A trained teacher is saved in the run directory and reused on ``--resume``; an interrupted
training resumes from its last epoch checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgekd.data.bundle import DataBundle
from edgekd.models.checkpoint import load_checkpoint
from edgekd.models.fold import fold_weight_norm
from edgekd.models.portable import load_portable, save_portable
from edgekd.models.spec import ModelSpec
from edgekd.recipe.schema import Recipe


def teacher_spec(recipe: Recipe) -> ModelSpec:
    t = recipe.teacher
    return ModelSpec(model=t.model, factory=t.factory, kwargs=t.kwargs)


def prepare_teacher(recipe: Recipe, data: DataBundle, run_path: Path, device: torch.device,
                    resume: bool) -> tuple[nn.Module, dict]:
    """Return the teacher in eval mode and facts about how it was obtained."""
    saved = run_path / "teacher" / "teacher.pt"
    if resume and saved.is_file():
        model, _ = load_portable(saved)
        return model.eval(), {"source": "run directory (resumed)"}
    model = teacher_spec(recipe).build(data.num_classes, data.input_shape)
    cfg = recipe.teacher
    if cfg.checkpoint is not None:
        load_checkpoint(model, cfg.checkpoint)
        info = {"source": f"checkpoint {cfg.checkpoint}"}
    else:
        from edgekd.train.objectives import CrossEntropyObjective
        from edgekd.train.trainer import fit

        assert cfg.train is not None  # the schema guarantees checkpoint xor train
        result = fit(model, CrossEntropyObjective(label_smoothing=cfg.train.label_smoothing), data, cfg.train,
                     run_path / "teacher" / "training", device=device, resume=resume, label="teacher",
                     seed=recipe.seed)
        info = {"source": "trained by the recipe", "epochs": result.epochs_run,
                "best_val_accuracy": result.best_val_accuracy}
    model = model.cpu().eval()
    # weight norm only reparametrises training: folded once here, the student copy, pruning and
    # export all see plain layers (and the saved teacher records the fold for its rebuild)
    folded = fold_weight_norm(model)
    if folded:
        info["weight_norm_folded"] = folded
    save_portable(model, saved, spec=teacher_spec(recipe), num_classes=data.num_classes,
                  input_shape=data.input_shape, extra={"role": "teacher"})
    return model, info
