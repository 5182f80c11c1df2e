"""The teacher: built from the recipe, then loaded from its checkpoint or trained on the data.

A trained teacher is saved in the run directory and reused on ``--resume``; an interrupted
training resumes from its last epoch checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from edgekd.data.bundle import DataBundle
from edgekd.models.checkpoint import load_checkpoint, load_state_dict_checked
from edgekd.models.fold import fold_weight_norm
from edgekd.models.portable import load_portable, save_portable
from edgekd.recipe.schema import Recipe

#: where a teacher module passed from Python comes from, in errors and the manifest
GIVEN_TEACHER = "the teacher module passed to edgekd.compress"


def load_given_teacher(recipe: Recipe, given: nn.Module, num_classes: int,
                       input_shape: tuple[int, ...]) -> nn.Module:
    """The recipe's teacher architecture holding ``given``'s weights (the caller's module is not touched).

    Rebuilt from the spec, not used as is, because every saved model of a run is rebuilt from its spec
    (the export stage's child process, ``--resume``, ``edgekd export``): a module whose weights do not fit
    the recipe's ``teacher.model``/``factory`` raises ``ModelError`` now, not at export."""
    model = recipe.teacher.spec().build(num_classes, input_shape)
    load_state_dict_checked(model, given.state_dict(), GIVEN_TEACHER)
    return model


def prepare_teacher(recipe: Recipe, data: DataBundle, run_path: Path, device: torch.device,
                    resume: bool, given: nn.Module | None = None,
                    console: Console | None = None) -> tuple[nn.Module, dict]:
    """Return the teacher in eval mode and facts about how it was obtained. ``given``: a trained module
    from the Python API (``edgekd.compress(teacher=...)``): used instead of a checkpoint or training;
    ``console``: where the teacher training's epoch lines go (the run's; default stderr)."""
    saved = run_path / "teacher" / "teacher.pt"
    if resume and saved.is_file():
        model, _ = load_portable(saved)
        return model.eval(), {"source": "run directory (resumed)"}
    cfg = recipe.teacher
    if given is not None:
        model = load_given_teacher(recipe, given, data.num_classes, data.input_shape)
        info = {"source": GIVEN_TEACHER}
    elif cfg.checkpoint is not None:
        model = recipe.teacher.spec().build(data.num_classes, data.input_shape)
        load_checkpoint(model, cfg.checkpoint)
        info = {"source": f"checkpoint {cfg.checkpoint}"}
    else:
        from edgekd.train.objectives import CrossEntropyObjective
        from edgekd.train.trainer import fit

        assert cfg.train is not None  # the schema guarantees checkpoint xor train
        model = recipe.teacher.spec().build(data.num_classes, data.input_shape)
        result = fit(model, CrossEntropyObjective(label_smoothing=cfg.train.label_smoothing), data, cfg.train,
                     run_path / "teacher" / "training", device=device, resume=resume, label="teacher",
                     seed=recipe.seed, console=console)
        info = {"source": "trained by the recipe", "epochs": result.epochs_run,
                "best_val_accuracy": result.best_val_accuracy, "guard_events": list(result.guard_events)}
    model = model.cpu().eval()
    # weight norm only reparametrises training: folded once here, the student copy, pruning and
    # export all see plain layers (and the saved teacher records the fold for its rebuild)
    folded = fold_weight_norm(model)
    if folded:
        info["weight_norm_folded"] = folded
    save_portable(model, saved, spec=recipe.teacher.spec(), num_classes=data.num_classes,
                  input_shape=data.input_shape, extra={"role": "teacher"})
    return model, info
