"""Distillation: each loss's value, hint adaptors, layer checks and their errors, the teacher
cache, and distill/finetune recovering a pruned ResNet-20 on real digits."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from edgekd.distill.config import RECOVERY_MAX_BATCH, DistillConfig, FinetuneConfig, KDTerm
from edgekd.distill.losses import (
    HintAdaptor,
    attention_loss,
    hint_loss,
    kd_loss,
    rkd_angle,
    rkd_distance,
)
from edgekd.distill.objective import DistillObjective
from edgekd.distill.stage import DistillStage, FinetuneStage, check_distill_layers
from edgekd.errors import RecipeError
from edgekd.models import build_model
from edgekd.models.evaluate import top1_accuracy
from edgekd.prune.config import PruneConfig
from edgekd.prune.targets import PruneEnv, prune_at_ratio
from edgekd.recipe.stages import StageEntry
from edgekd.stage.base import registered_stages
from edgekd.train.config import TrainConfig
from edgekd.train.objectives import Batch, CrossEntropyObjective
from edgekd.train.trainer import fit

CPU = torch.device("cpu")


# -- loss values ---------------------------------------------------------------------------------

def test_kd_loss_values():
    torch.manual_seed(0)
    s, t, y = torch.randn(16, 10), torch.randn(16, 10), torch.randint(0, 10, (16,))
    same, _ = kd_loss(t, t, y, temperature=4.0, alpha=1.0)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    hard, _ = kd_loss(s, t, y, temperature=4.0, alpha=0.0)
    assert hard.item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    # alpha=1: T² · mean over the batch of sum_k p_t log(p_t / p_s), at temperature T
    T = 3.0
    p_t, log_p_s = F.softmax(t / T, 1), F.log_softmax(s / T, 1)
    expected = (p_t * (p_t.log() - log_p_s)).sum(1).mean() * T * T
    soft, parts = kd_loss(s, t, y, temperature=T, alpha=1.0)
    assert soft.item() == pytest.approx(expected.item(), rel=1e-5)
    blend, _ = kd_loss(s, t, y, temperature=T, alpha=0.25)
    assert blend.item() == pytest.approx(0.25 * parts["kd_soft"].item() + 0.75 * parts["ce"].item(), rel=1e-5)


def test_hint_adaptor_is_created_only_when_shapes_differ():
    s, t = torch.randn(4, 8, 6, 6), torch.randn(4, 16, 3, 3)
    adaptor = HintAdaptor(s.shape, t.shape)
    assert isinstance(adaptor.proj, nn.Conv2d) and adaptor.proj.kernel_size == (1, 1)
    assert (adaptor.proj.in_channels, adaptor.proj.out_channels) == (8, 16)
    assert adaptor(s).shape == t.shape
    assert HintAdaptor(t.shape, t.shape).is_identity
    assert hint_loss(HintAdaptor(t.shape, t.shape)(t), t).item() == 0.0
    linear = HintAdaptor(torch.Size([4, 32]), torch.Size([4, 64]))
    assert isinstance(linear.proj, nn.Linear) and linear(torch.randn(4, 32)).shape == (4, 64)
    tokens = HintAdaptor(torch.Size([4, 17, 32]), torch.Size([4, 17, 64]))  # transformer (N, tokens, D)
    assert isinstance(tokens.proj, nn.Linear) and tokens(torch.randn(4, 17, 32)).shape == (4, 17, 64)
    conv1d = HintAdaptor(torch.Size([4, 8, 20]), torch.Size([4, 32, 20]))  # 1-D conv maps (N, C, L)
    assert isinstance(conv1d.proj, nn.Conv1d)
    with pytest.raises(ValueError, match="different number of dimensions"):
        HintAdaptor(torch.Size([4, 8, 6, 6]), torch.Size([4, 8]))


def test_attention_loss_ignores_channel_count_and_scale():
    torch.manual_seed(0)
    t = torch.randn(4, 16, 8, 8)
    # the student's map equals the teacher's when its channels are a scaled, repeated copy
    s = torch.cat([t, t], dim=1) * 3.0
    assert attention_loss(s, t).item() == pytest.approx(0.0, abs=1e-7)
    other = torch.randn(4, 4, 16, 16)  # a different map, at twice the resolution
    assert attention_loss(other, t).item() > 1e-4


def test_rkd_terms_are_scale_free_relations():
    torch.manual_seed(0)
    t = torch.randn(12, 10)
    # distances normalised by their mean: a scaled copy has the same relations; angles: also shifted
    assert rkd_distance(2.5 * t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert rkd_angle(2.5 * t + 1.0, t).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(12, 10, requires_grad=True)
    loss = rkd_distance(s, t) + rkd_angle(s, t)
    loss.backward()
    assert loss.item() > 0 and s.grad.abs().sum() > 0


# -- config and validation errors ---------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    {"temperature": 0},
    {"alpha": 1.5},
    {"losses": []},
    {"losses": [{"kind": "kd", "weight": -1}]},
    {"losses": [{"kind": "hint", "student_layer": "a", "teacher_layer": "b", "weight": -0.5}]},
    {"losses": [{"kind": "hint", "student_layer": "a"}]},
    {"losses": [{"kind": "rkd", "student_layer": "a"}]},
    {"losses": [{"kind": "kd"}, {"kind": "kd"}]},
    {"losses": [{"kind": "fitnet"}]},
])
def test_distill_config_rejects_bad_values(bad):
    with pytest.raises(ValidationError):
        DistillConfig(**bad)


def test_recipe_stage_entries():
    entry = StageEntry.model_validate({"distill": {"epochs": 2, "losses": [{"kind": "kd"}]}})
    assert entry.key == "distill" and isinstance(entry.config, DistillConfig)
    assert StageEntry.model_validate({"finetune": {"epochs": 1}}).key == "finetune"
    stages = registered_stages()
    assert stages[DistillConfig] is DistillStage and stages[FinetuneConfig] is FinetuneStage
    assert not DistillStage.main_process_only and not FinetuneStage.main_process_only


@pytest.fixture(scope="module")
def resnets(digits8):
    torch.manual_seed(0)
    teacher = build_model("resnet20", num_classes=10, input_shape=digits8.input_shape)
    student = build_model("resnet20", num_classes=10, input_shape=digits8.input_shape)
    return teacher, student


def test_unknown_layer_lists_close_names(resnets, digits8):
    teacher, student = resnets
    cfg = DistillConfig(losses=[{"kind": "kd"}, {"kind": "hint", "student_layer": "layr2", "teacher_layer": "layer2"}])
    with pytest.raises(RecipeError) as info:
        check_distill_layers(cfg, teacher, student, digits8.example_batch(2))
    assert info.value.key == "distill.losses.1.student_layer"
    assert "student has no layer 'layr2'" in str(info.value) and "'layer2'" in info.value.hint
    cfg = DistillConfig(losses=[{"kind": "attention", "student_layer": "layer3", "teacher_layer": "layer3.2.cnv1"}])
    with pytest.raises(RecipeError, match="teacher has no layer") as info:
        check_distill_layers(cfg, teacher, student, digits8.example_batch(2))
    assert info.value.key == "distill.losses.0.teacher_layer" and "layer3.2.conv1" in info.value.hint


def test_shape_and_class_count_errors(resnets, digits8):
    teacher, student = resnets
    example = digits8.example_batch(2)
    flat = DistillConfig(losses=[{"kind": "attention", "student_layer": "fc", "teacher_layer": "fc"}])
    with pytest.raises(RecipeError, match="spatial feature maps") as info:
        check_distill_layers(flat, teacher, student, example)
    assert info.value.key == "distill.losses.0"
    mixed = DistillConfig(losses=[{"kind": "hint", "student_layer": "layer3", "teacher_layer": "fc"}])
    with pytest.raises(RecipeError, match="same rank"):
        check_distill_layers(mixed, teacher, student, example)
    five = build_model("resnet20", num_classes=5, input_shape=digits8.input_shape)
    with pytest.raises(RecipeError, match="predicts 5 classes but the teacher 10") as info:
        check_distill_layers(DistillConfig(), teacher, five, example)
    assert info.value.key == "distill"
    ok = DistillConfig(losses=[{"kind": "kd"}, {"kind": "hint", "student_layer": "layer2", "teacher_layer": "layer2"},
                               {"kind": "attention", "student_layer": "layer3", "teacher_layer": "layer3"},
                               {"kind": "rkd", "student_layer": "layer3", "teacher_layer": "layer3"}])
    check_distill_layers(ok, teacher, student, example)


# -- training ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_and_pruned(digits8, tmp_path_factory):
    """A ResNet-20 trained on real digits, and a copy pruned 70% (channels) by torch-pruning."""
    torch.manual_seed(0)
    teacher = build_model("resnet20", num_classes=10, input_shape=digits8.input_shape)
    fit(teacher, CrossEntropyObjective(), digits8, TrainConfig(epochs=3), tmp_path_factory.mktemp("teacher"),
        device=CPU)
    teacher.eval()
    student = copy.deepcopy(teacher)
    env = PruneEnv(config=PruneConfig(ratio=0.7, probe=None), samples=digits8.calibration_batch(64), teacher=teacher)
    prune_at_ratio(student, env, 0.7)
    return teacher, student


def test_distill_recovers_pruned_student_with_cache_and_hint_adaptor(teacher_and_pruned, digits8, tmp_path):
    teacher, pruned = teacher_and_pruned
    teacher_acc = top1_accuracy(teacher, digits8.val_x, digits8.val_y)
    before = top1_accuracy(pruned, digits8.val_x, digits8.val_y)
    cfg = DistillConfig(epochs=2, losses=[{"kind": "kd"},
                                          {"kind": "hint", "student_layer": "layer2", "teacher_layer": "layer2"}])
    runs = {}
    for cache in (True, False):
        cfg.teacher_cache = cache
        student = copy.deepcopy(pruned)
        keys_before = set(student.state_dict())
        objective = DistillObjective.from_config(teacher, cfg)
        result = fit(student, objective, digits8, cfg, tmp_path / str(cache), device=CPU, label="distill")
        runs[cache] = (result, objective, student)
        # the adaptor maps the pruned layer2 (fewer channels) onto the teacher's; it is not in the student
        assert isinstance(objective.adaptors["1"].proj, nn.Conv2d)
        assert set(student.state_dict()) == keys_before
        assert "extra" in torch.load(tmp_path / str(cache) / "last.pt", weights_only=True)
    cached, uncached = runs[True][0], runs[False][0]
    assert runs[True][1].cache_info["enabled"] and not runs[False][1].cache_info["enabled"]
    # the teacher is deterministic in eval mode: the cache changes speed, not results
    for a, b in zip(cached.history, uncached.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"])
    assert {"train_kd_soft", "train_ce", "train_hint1"} <= set(cached.history[0])
    assert cached.best_val_accuracy > before + 10 and cached.best_val_accuracy > teacher_acc - 15
    # the teacher is left as it was: on its device, in eval mode, parameters untouched
    assert next(teacher.parameters()).device == CPU and not teacher.training
    assert all(p.requires_grad for p in teacher.parameters())


def test_cache_is_skipped_when_over_budget(teacher_and_pruned, digits8, tmp_path):
    teacher, pruned = teacher_and_pruned
    cfg = DistillConfig(epochs=1, cache_max_mb=0.01)
    objective = DistillObjective.from_config(teacher, cfg)
    fit(copy.deepcopy(pruned), objective, digits8, cfg, tmp_path, device=CPU)
    assert not objective.cache_info["enabled"] and "cache_max_mb" in objective.cache_info["reason"]


def test_attention_and_rkd_terms_train(teacher_and_pruned, digits8, tmp_path):
    teacher, pruned = teacher_and_pruned
    before = top1_accuracy(pruned, digits8.val_x, digits8.val_y)  # ~10%: 70% pruning leaves chance level
    cfg = DistillConfig(epochs=2, losses=[
        {"kind": "attention", "student_layer": "layer3", "teacher_layer": "layer3"},
        {"kind": "rkd"}])
    result = fit(copy.deepcopy(pruned), DistillObjective.from_config(teacher, cfg), digits8, cfg, tmp_path, device=CPU)
    row = result.history[-1]
    # without a kd term the hard-label cross-entropy is still part of the loss
    assert {"train_attention0", "train_rkd1_distance", "train_rkd1_angle", "train_ce"} <= set(row)
    assert all(math.isfinite(v) for v in row.values()) and result.best_val_accuracy > before + 15


def test_finetune_baseline_trains_on_hard_labels(teacher_and_pruned, digits8, tmp_path):
    _, pruned = teacher_and_pruned
    student = copy.deepcopy(pruned)
    before = top1_accuracy(student, digits8.val_x, digits8.val_y)
    result = fit(student, CrossEntropyObjective(), digits8, FinetuneConfig(epochs=2), tmp_path, device=CPU,
                 label="finetune")
    assert set(result.history[0]) >= {"train_ce", "val_accuracy"} and "train_kd_soft" not in result.history[0]
    assert result.best_val_accuracy > before


# -- recovery that does not destroy what it recovers ----------------------------------------------

def test_recovery_defaults_depend_on_where_the_student_starts():
    warm, cold = DistillConfig().concrete(from_weights=True), DistillConfig().concrete(from_weights=False)
    assert (warm.lr, warm.warmup_epochs, warm.grad_clip) == (0.01, 0.2, 5.0)
    assert (cold.lr, cold.warmup_epochs) == (0.05, 1.0)
    # a pruned or copied student relearns the task from labels: half the loss on them (issue 14's MobileNetV2
    # pruned 50% recovered to 85.8% test with alpha 0.5, 78-81% with 0.9, teacher 84.4%; docs/distill.md)
    assert (warm.alpha, cold.alpha) == (0.5, 0.9)
    assert DistillConfig(alpha=0.7).concrete(from_weights=True).alpha == 0.7
    transfer = DistillConfig(source={"kind": "transfer", "labeled_fraction": 0.1}).concrete(from_weights=True)
    assert transfer.alpha == 0.9  # few labels: the soft targets carry the training
    assert DistillObjective.from_config(nn.Identity(), warm).alpha == 0.5
    assert DistillConfig(lr=0.2).concrete(from_weights=True).lr == 0.2  # a recipe's value wins
    assert FinetuneConfig().concrete(from_weights=True).lr == 0.01 and FinetuneConfig().grad_clip is None
    # from trained weights the cosine schedule's last epoch ships; early stopping searches for the best one
    assert (warm.keep, cold.keep) == ("last", "best_val_accuracy")
    assert DistillConfig(early_stopping_patience=2).concrete(from_weights=True).keep == "best_val_accuracy"
    assert DistillConfig(keep="best_val_loss").concrete(from_weights=True).keep == "best_val_loss"
    # from trained weights the batch is capped (more optimizer steps per epoch); the data's smaller batch or the
    # stage's own batch_size wins; from random weights the data section's batch is used as it is
    assert DistillConfig().concrete(True, data_batch=64).batch_size == RECOVERY_MAX_BATCH
    assert DistillConfig().concrete(True, data_batch=8).batch_size == 8
    assert DistillConfig(batch_size=128).concrete(True, data_batch=64).batch_size == 128
    assert DistillConfig().concrete(False, data_batch=64).batch_size is None
    assert FinetuneConfig().concrete(True, data_batch=64).batch_size == RECOVERY_MAX_BATCH
    # a student that kept less than 90% of the teacher's accuracy above chance is retrained (lr rewinding), not
    # fine-tuned; a recipe's lr still wins, and a student from random weights keeps the from-scratch lr
    assert DistillConfig().concrete(True, 64, start_share=0.53).lr == 0.03
    assert FinetuneConfig().concrete(True, 64, start_share=0.53).lr == 0.03
    assert DistillConfig().concrete(True, 64, start_share=0.95).lr == 0.01
    assert DistillConfig(lr=0.01).concrete(True, 64, start_share=0.2).lr == 0.01
    assert DistillConfig().concrete(False, 64, start_share=0.2).lr == 0.05


def test_distill_stage_picks_the_retraining_lr_for_a_damaged_student(teacher_and_pruned, digits8, tmp_path):
    """The stage measures how much of the teacher's val top-1 the student keeps and records it with the lr."""
    from edgekd.distill.stage import start_share
    from edgekd.pipeline.rundir import RunDir
    from edgekd.recipe.schema import Recipe
    from edgekd.stage.context import RunContext
    from edgekd.train.guard import chance, kept_share

    recipe = Recipe.model_validate({"name": "d", "data": {"dataset": "digits", "image_size": 8},
                                    "teacher": {"model": "resnet20", "train": {"epochs": 1}}})
    teacher, pruned = teacher_and_pruned
    # the teacher's copy keeps everything; the fixture's pruned student (before any recovery) is near chance
    for student, crippled in ((copy.deepcopy(teacher), False), (copy.deepcopy(pruned), True)):
        ctx = RunContext(recipe=recipe, run_dir=RunDir(tmp_path / str(crippled)), data=digits8,
                         device=torch.device("cpu"), teacher=teacher, student=student)
        share = start_share(ctx)
        expected = kept_share(top1_accuracy(student, digits8.val_x, digits8.val_y),
                              top1_accuracy(teacher, digits8.val_x, digits8.val_y), chance(10))
        assert share == pytest.approx(expected)
        assert (share < 0.9) == crippled
        assert DistillConfig().concrete(True, 64, share).lr == (0.03 if crippled else 0.01)


def test_logit_standardization_ignores_the_teachers_logit_scale(teacher_and_pruned, digits8):
    from edgekd.distill.losses import standardize_logits

    teacher, _ = teacher_and_pruned
    with torch.no_grad():
        t = teacher(digits8.val_x[:128])
    y = digits8.val_y[:128]
    # a teacher that is the same classifier with 10x larger logits (longer training, no label smoothing)
    raw, _ = kd_loss(t, 10 * t, y, temperature=4.0, alpha=1.0)
    std, _ = kd_loss(t, 10 * t, y, temperature=4.0, alpha=1.0, standardize=True)
    assert raw.item() > 1.0 and std.item() == pytest.approx(0.0, abs=1e-5)
    z = standardize_logits(10 * t)
    assert torch.allclose(z.mean(1), torch.zeros(len(z)), atol=1e-5) and torch.allclose(z.std(1), torch.ones(len(z)))


def test_guard_keeps_a_recovering_student_above_where_it_started(digits8, tmp_path):
    """A lightly pruned student at ~90% and an lr that wrecks it (1.0, no warm-up): without the guard its
    first epoch falls far below its start; with it, every kept epoch ends at or near the start and above."""
    from edgekd.models.batchnorm import recalibrate_batchnorm
    from edgekd.train.guard import val_noise

    torch.manual_seed(0)
    teacher = build_model("resnet20", num_classes=10, input_shape=digits8.input_shape)
    fit(teacher, CrossEntropyObjective(), digits8, TrainConfig(epochs=3), tmp_path / "t", device=CPU)
    student = copy.deepcopy(teacher.eval())
    prune_at_ratio(student, PruneEnv(config=PruneConfig(ratio=0.25, probe=None),
                                     samples=digits8.calibration_batch(64), teacher=teacher), 0.25)
    recalibrate_batchnorm(student, digits8.train_loader(64), 8)
    start = top1_accuracy(student, digits8.val_x, digits8.val_y)
    assert start > 60.0
    harsh = {"epochs": 2, "lr": 1.0, "warmup_epochs": 0, "schedule": "constant", "grad_clip": None}
    off = fit(copy.deepcopy(student), DistillObjective(teacher, [KDTerm(kind="kd")]), digits8,
              DistillConfig(**harsh, guard={"enabled": False}), tmp_path / "off", device=CPU)
    assert off.history[0]["val_accuracy"] < start - 10  # the lr destroys what it should recover
    on = fit(copy.deepcopy(student), DistillObjective(teacher, [KDTerm(kind="kd")]), digits8, DistillConfig(**harsh),
             tmp_path / "on", device=CPU)
    assert on.rollbacks >= 1 and on.start_val_accuracy == pytest.approx(start)
    # the guard's contract: no kept epoch more than max(2 points, two standard errors of the start's val reading)
    # below the start (269 val samples at ~88%: 3.9 points; seen on an AMD EPYC: epoch 1 at 85.9 from 88.5)
    allowed = max(2.0, val_noise(start, len(digits8.val_y)))
    assert all(row["val_accuracy"] >= start - allowed for row in on.history)
    assert on.best_val_accuracy > off.best_val_accuracy


def test_transfer_kd_over_unlabeled_inputs_beats_finetuning_on_the_labeled_few(teacher_and_pruned, digits8, tmp_path):
    from edgekd.data.transfer import keep_labels, label_counts, labeled_only

    teacher, _ = teacher_and_pruned
    few = keep_labels(digits8, 0.1, seed=0)
    counts = label_counts(few)
    assert counts["labeled"] == pytest.approx(0.1 * len(digits8.train), abs=10) and counts["unlabeled"] > 900
    assert set(torch.bincount(few.train_y[few.train_y >= 0]).tolist()) <= set(range(10, 14))  # stratified

    def mlp():
        torch.manual_seed(0)
        return build_model("mlp", num_classes=10, input_shape=digits8.input_shape, hidden=64)

    kd_cfg = DistillConfig(epochs=6, optimizer="adamw", lr=3e-3, source={"kind": "transfer", "labeled_fraction": 0.1})
    kd = fit(mlp(), DistillObjective.from_config(teacher, kd_cfg), few, kd_cfg, tmp_path / "kd", device=CPU)
    # fine-tuning sees only the labeled tenth; 10x the epochs gives it the same number of steps
    ft_cfg = FinetuneConfig(epochs=60, optimizer="adamw", lr=3e-3)
    ft = fit(mlp(), CrossEntropyObjective(), labeled_only(few), ft_cfg, tmp_path / "ft", device=CPU)
    assert kd.history[0]["train_accuracy"] == kd.history[0]["train_accuracy"]  # labeled samples scored (not NaN)
    assert kd.best_val_accuracy > ft.best_val_accuracy + 5


def test_soft_until_teacher_turns_the_soft_share_off_once_the_student_reaches_the_teacher_on_val(digits8):
    """``soft_until_teacher``: the kd term's alpha is 0 from the epoch after a val top-1 at or above the teacher's,
    the loss is then the hard-label cross-entropy alone, and the decision follows the history (a rollback to an
    earlier epoch turns the soft term back on)."""
    torch.manual_seed(0)
    teacher = build_model("mlp", num_classes=10, input_shape=digits8.input_shape, hidden=32).eval()
    student = copy.deepcopy(teacher)
    objective = DistillObjective.from_config(
        teacher, DistillConfig(epochs=3, alpha=0.5, soft_until_teacher=True).concrete(True, 64))
    objective.setup(student, digits8, torch.device("cpu"))
    try:
        reached = objective.teacher_val_accuracy
        assert reached == top1_accuracy(teacher, digits8.val_x, digits8.val_y)
        batch = Batch(digits8.train_x[:16], digits8.train_y[:16], torch.arange(16))
        objective.before_epoch(2, [{"val_accuracy": reached - 1.0}])
        assert objective.soft_off_from is None and objective.terms[0].settings.alpha == 0.5
        soft = objective.compute(student, batch).total
        objective.before_epoch(3, [{"val_accuracy": reached - 1.0}, {"val_accuracy": reached}])
        assert objective.soft_off_from == 3 and objective.terms[0].settings.alpha == 0.0
        hard = objective.compute(student, batch).total
        assert hard.item() == pytest.approx(F.cross_entropy(student(batch.x), batch.y).item(), rel=1e-5)
        assert soft.item() != pytest.approx(hard.item(), rel=1e-3)
        objective.before_epoch(2, [{"val_accuracy": reached - 1.0}])  # rolled back before the epoch that reached it
        assert objective.soft_off_from is None and objective.terms[0].settings.alpha == 0.5
        assert objective.describe()["teacher_val_accuracy"] == reached
    finally:
        objective.teardown()


def test_the_ledger_notes_give_the_lr_the_kept_epochs_trained_at_after_rollbacks(tmp_path):
    """A guard rollback lowers the lr: the ledger row says so beside the lr the config asked for."""
    from edgekd.distill.stage import training_notes
    from edgekd.train.trainer import FitResult

    events = [{"epoch": 1, "action": "rollback", "reason": "loss exploded", "peak_lr": 0.3},
              {"epoch": 1, "action": "rollback", "reason": "loss exploded", "peak_lr": 0.09}]
    result = FitResult(best_val_accuracy=90.0, best_epoch=2, epochs_run=2, history=[], checkpoint=tmp_path / "b.pt",
                       guard_events=events)
    notes = training_notes(result, CrossEntropyObjective(), TrainConfig(epochs=2, lr=1.0))
    assert notes["lr"] == 1.0 and notes["lr_after_rollbacks"] == 0.09
    assert "peak lr 0.09" in notes["guard"]
    assert "lr_after_rollbacks" not in training_notes(FitResult(90.0, 2, 2, [], tmp_path / "b.pt"),
                                                      CrossEntropyObjective(), TrainConfig(epochs=2, lr=1.0))
