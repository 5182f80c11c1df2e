"""Training-batch augmentation: real translations and flips, reproducible by seed, consistent
teacher/student views in distillation (cache off), and recipe validation of data that cannot
take it."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from edgekd.distill.config import KDTerm
from edgekd.distill.objective import DistillObjective
from edgekd.distill.stage import training_notes
from edgekd.errors import ConfigError, RecipeError
from edgekd.pipeline.validate import validate_document
from edgekd.recipe.load import load_recipe
from edgekd.train.augment import AugmentConfig, augment_batch, augment_generator
from edgekd.train.config import TrainConfig
from edgekd.train.objectives import CrossEntropyObjective
from edgekd.train.trainer import fit
from tests.test_train import small_cnn

CPU = torch.device("cpu")


def _gen(seed=0, epoch=1):
    return augment_generator(seed, epoch, 0, CPU)


def test_each_image_is_a_window_of_its_edge_padded_self(digits8):
    x = digits8.train_x[:64]
    out = augment_batch(x, AugmentConfig(shift=2), _gen())
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    windows = {(a, b) for a in range(5) for b in range(5)}
    shifted = 0
    for i in range(len(x)):
        hits = [(a, b) for a, b in windows if torch.equal(out[i], padded[i, :, a:a + 8, b:b + 8])]
        assert hits, f"sample {i} is not a shifted copy of itself"
        shifted += (2, 2) not in hits
    assert shifted > 32  # 24 of 25 offsets move the image


def test_one_d_signals_shift_along_their_length_and_refuse_hflip(digits8):
    x = torch.randn(16, 1, 40)
    out = augment_batch(x, AugmentConfig(shift=3), _gen())
    padded = F.pad(x, (3, 3), mode="replicate")
    for i in range(len(x)):
        assert any(torch.equal(out[i], padded[i, :, a:a + 40]) for a in range(7))
    with pytest.raises(ConfigError, match="hflip needs images"):
        augment_batch(x, AugmentConfig(hflip=True), _gen())


def test_draws_repeat_with_the_seed_and_epoch_and_change_across_epochs(digits8):
    x = digits8.train_x[:64]
    config = AugmentConfig(shift=2, hflip=True)
    first = augment_batch(x, config, _gen(0, 1))
    assert torch.equal(first, augment_batch(x, config, _gen(0, 1)))
    assert not torch.equal(first, augment_batch(x, config, _gen(0, 2)))
    flipped = augment_batch(x, AugmentConfig(hflip=True), _gen())
    is_flipped = [torch.equal(flipped[i], x[i].flip(-1)) and not torch.equal(x[i], x[i].flip(-1))
                  for i in range(len(x))]
    assert 10 < sum(is_flipped) < 54


def test_fit_with_augment_learns_and_distillation_turns_its_cache_off(digits8, tmp_path):
    config = TrainConfig(epochs=3, augment=AugmentConfig(shift=1))
    teacher = small_cnn(0)
    result = fit(teacher, CrossEntropyObjective(), digits8, config, tmp_path / "teacher", device=CPU)
    assert result.best_val_accuracy > 80.0
    teacher.eval()
    objective = DistillObjective(teacher, [KDTerm(kind="kd")], cache=True)
    result = fit(small_cnn(1), objective, digits8, TrainConfig(epochs=2, augment=AugmentConfig(shift=1)),
                 tmp_path / "student", device=CPU)
    assert objective.cache_info == {"enabled": False,
                                    "reason": "augment is on: the teacher sees each step's augmented view"}
    assert result.best_val_accuracy > 60.0 and result.history[-1]["train_kd_soft"] > 0
    # the report's ledger says how the student was trained
    notes = training_notes(result, objective, TrainConfig(epochs=2, augment=AugmentConfig(shift=1, hflip=True)))
    expected = {"epochs": 2, "best_epoch": result.best_epoch, "loss": "kd (T 4, alpha 0.9)",
                "teacher_cache": "off", "augment": "shift 1, hflip", "lr": 0.05, "warmup_epochs": 1.0}
    assert {k: notes.get(k) for k in expected} == expected
    # without augment the same objective caches
    cached = DistillObjective(teacher, [KDTerm(kind="kd")], cache=True)
    fit(small_cnn(1), cached, digits8, TrainConfig(epochs=1), tmp_path / "cached", device=CPU)
    assert cached.cache_info["enabled"] is True
    plain = training_notes(result, CrossEntropyObjective(), TrainConfig(epochs=2))
    assert plain["loss"] == "cross-entropy" and "augment" not in plain and "teacher_cache" not in plain


def test_validate_names_the_augment_key_when_the_data_cannot_take_it(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent("""\
        name: t
        data:
          dataset: mnist1d
          num_samples: 600
        teacher:
          model: cnn1d
          train:
            epochs: 1
            augment: {shift: 2, hflip: true}
        """))
    with pytest.raises(RecipeError) as info:
        validate_document(load_recipe(path))
    err = info.value
    assert err.key == "teacher.train.augment" and err.line == 9
    assert "hflip needs images" in str(err) and "drop hflip" in err.hint
