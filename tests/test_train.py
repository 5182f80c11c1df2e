"""The trainer: training on real digits, checkpoints, resume after a hard kill, NaN stops,
schedules, early stopping, devices, and 2-process DDP against one process."""

from __future__ import annotations

import copy
import csv
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from edgekd.errors import ConfigError, TrainingDivergedError
from edgekd.train.config import GuardConfig, TrainConfig
from edgekd.train.distributed import resolve_device
from edgekd.train.guard import epoch_problem, val_noise
from edgekd.train.objectives import Batch, CrossEntropyObjective, LossOutput
from edgekd.train.schedule import lr_multiplier
from edgekd.train.trainer import fit

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def small_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def test_fit_trains_writes_metrics_and_keeps_best_weights(digits8, tmp_path):
    model = small_cnn()
    result = fit(model, CrossEntropyObjective(), digits8, TrainConfig(epochs=3), tmp_path, device=CPU)
    assert result.epochs_run == 3 and len(result.history) == 3
    assert result.best_val_accuracy > 85.0  # a real conv net on real digits learns in 3 epochs
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"train_loss", "val_accuracy", "lr", "train_time_s"} <= set(rows[0])
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    # every checkpoint loads with weights_only=True; the model ends on the best epoch's weights
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert last["epoch"] == 3 and best["epoch"] == result.best_epoch
    assert best["val_accuracy"] == pytest.approx(result.best_val_accuracy)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, best["model"][key])


KILLED_CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    from torch import nn
    torch.set_num_threads(1)
    sys.path.insert(0, {root!r})
    from edgekd.data import digits_bundle
    from edgekd.train.config import TrainConfig
    from edgekd.train.objectives import CrossEntropyObjective
    from edgekd.train.trainer import fit

    class DieMidEpoch(CrossEntropyObjective):
        # SIGKILL (no clean-up, like an OOM kill or a pulled plug) in the middle of epoch 2
        steps = 0
        def compute(self, model, batch):
            self.steps += 1
            if self.steps == {kill_step}:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().compute(model, batch)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    fit(model, DieMidEpoch(), digits_bundle(image_size=8), TrainConfig(epochs=3, batch_size=64), {workdir!r},
        device=torch.device("cpu"), seed=0)
""")


def test_resume_after_a_hard_kill_mid_epoch_matches_an_uninterrupted_run(digits8, tmp_path):
    config = TrainConfig(epochs=3, batch_size=64)
    steps_per_epoch = -(-len(digits8.train) // 64)
    workdir = tmp_path / "killed"
    child = subprocess.run([sys.executable, "-c", KILLED_CHILD.format(
        root=str(ROOT), kill_step=steps_per_epoch + 5, workdir=str(workdir))], capture_output=True, text=True)
    assert child.returncode == -9, child.stderr  # really killed, mid-epoch 2
    assert torch.load(workdir / "last.pt", weights_only=True)["epoch"] == 1

    resumed_model = small_mlp(seed=123)  # the weights come from the checkpoint, not from here
    resumed = fit(resumed_model, CrossEntropyObjective(), digits8, config, workdir, device=CPU, resume=True)
    assert resumed.resumed_from_epoch == 1 and resumed.epochs_run == 3

    straight_model = small_mlp(seed=0)
    straight = fit(straight_model, CrossEntropyObjective(), digits8, config, tmp_path / "straight", device=CPU)
    for a, b in zip(resumed.history, straight.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"])
    for key, value in resumed_model.state_dict().items():
        torch.testing.assert_close(value, straight_model.state_dict()[key])
    assert len(list(csv.DictReader((workdir / "metrics.csv").open()))) == 3


def test_resume_of_a_finished_run_trains_no_more(digits8, tmp_path):
    fit(small_mlp(), CrossEntropyObjective(), digits8, TrainConfig(epochs=2), tmp_path, device=CPU)
    again = small_mlp(seed=5)
    result = fit(again, CrossEntropyObjective(), digits8, TrainConfig(epochs=2), tmp_path, device=CPU, resume=True)
    assert result.epochs_run == 2 and result.resumed_from_epoch == 2 and len(result.history) == 2
    best = torch.load(tmp_path / "best.pt", weights_only=True)["model"]
    for key, value in again.state_dict().items():
        torch.testing.assert_close(value, best[key])


class PoisonFromStep(CrossEntropyObjective):
    """A loss that turns NaN from a given step on, as a diverging run's does."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step, self.calls = step, 0

    def compute(self, model: nn.Module, batch: Batch) -> LossOutput:
        self.calls += 1
        out = super().compute(model, batch)
        if self.calls >= self.step:
            out.total = out.total * float("nan")
        return out


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(digits8, tmp_path):
    steps_per_epoch = -(-len(digits8.train) // 64)
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at epoch 2, step 3") as info:
        fit(small_mlp(), PoisonFromStep(steps_per_epoch + 3), digits8,
            TrainConfig(epochs=3, batch_size=64, guard={"enabled": False}), tmp_path, device=CPU)
    assert "epoch 1) is kept" in str(info.value) and info.value.hint
    kept = torch.load(tmp_path / "last.pt", weights_only=True)
    assert kept["epoch"] == 1 and all(torch.isfinite(v).all() for v in kept["model"].values())


def test_val_drop_counts_only_beyond_the_readings_noise():
    # a weak start on a small val split reads points apart between epochs (issue 13's weight-normalised TCN case:
    # 24.17% at the start, 22.08% after an epoch at lr 2.7e-5, on 240 samples); a strong one on 269 does not
    assert round(val_noise(24.17, 240), 2) == 5.53 and round(val_noise(98.0, 269), 2) == 1.71
    guard = GuardConfig()
    def problem(val, start, n):
        return epoch_problem(90.0, val, start, 10, guard, val_samples=n)
    assert problem(22.08, 24.17, 240) is None                          # within two standard errors
    assert "fell to 14.58% from 24.17%" in problem(14.58, 24.17, 240)  # well beyond them
    assert "more than 2 points" in problem(95.5, 98.0, 269)            # the configured floor still holds
    assert problem(22.08, 24.17, None) is not None                     # without the split size: the floor alone


def test_guard_gives_up_after_its_rollbacks_and_says_what_it_tried(digits8, tmp_path):
    steps_per_epoch = -(-len(digits8.train) // 64)
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at epoch 2") as info:
        fit(small_mlp(), PoisonFromStep(steps_per_epoch + 3), digits8,
            TrainConfig(epochs=3, batch_size=64, guard={"max_rollbacks": 2}), tmp_path, device=CPU)
    assert "after 2 rollback(s)" in str(info.value) and "epoch 1) is kept" in str(info.value)
    kept = torch.load(tmp_path / "last.pt", weights_only=True)
    assert kept["epoch"] == 1 and all(torch.isfinite(v).all() for v in kept["model"].values())


def bn_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))


#: plain SGD at lr 5 with no warm-up: the loss explodes within the first epoch on digits
EXPLODING = {"epochs": 3, "lr": 5.0, "warmup_epochs": 0, "schedule": "constant", "batch_size": 64}


def test_guard_rolls_back_an_exploding_run_lowers_the_lr_and_finishes(digits8, tmp_path):
    model = bn_mlp()
    result = fit(model, CrossEntropyObjective(), digits8, TrainConfig(**EXPLODING), tmp_path, device=CPU)
    rollbacks = [e for e in result.guard_events if e["action"] == "rollback"]
    assert rollbacks and rollbacks[0]["epoch"] == 1 and "exploded" in rollbacks[0]["reason"]
    assert rollbacks[0]["peak_lr"] == pytest.approx(5.0 * 0.3 ** len(rollbacks))
    assert all(row["lr"] == pytest.approx(rollbacks[-1]["peak_lr"]) for row in result.history)
    assert result.epochs_run == 3 and result.best_val_accuracy > 85.0  # and it learned after all
    # the checkpoint carries the events, so a report (and a resumed run) sees them
    assert torch.load(tmp_path / "last.pt", weights_only=True)["guard_events"] == result.guard_events
    off = fit(bn_mlp(), CrossEntropyObjective(), digits8, TrainConfig(**EXPLODING, guard={"enabled": False}),
              tmp_path / "off", device=CPU)
    assert off.best_val_accuracy < result.best_val_accuracy  # what the rollback saved


def test_resumed_run_takes_the_same_path_through_a_rollback(digits8, tmp_path):
    straight_model = bn_mlp()
    straight = fit(straight_model, CrossEntropyObjective(), digits8, TrainConfig(**EXPLODING), tmp_path / "straight",
                   device=CPU)
    assert straight.rollbacks >= 1
    # the same run stopped after epoch 1 (its rollback inside), then resumed to the end
    first = fit(bn_mlp(), CrossEntropyObjective(), digits8, TrainConfig(**{**EXPLODING, "epochs": 1}),
                tmp_path / "resumed", device=CPU)
    assert first.guard_events == straight.guard_events[:len(first.guard_events)]
    ckpt = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    ckpt["config"]["epochs"] = 3  # a 3-epoch run that was interrupted after epoch 1
    torch.save(ckpt, tmp_path / "resumed" / "last.pt")
    resumed_model = bn_mlp(seed=7)
    resumed = fit(resumed_model, CrossEntropyObjective(), digits8, TrainConfig(**EXPLODING), tmp_path / "resumed",
                  device=CPU, resume=True)
    assert resumed.resumed_from_epoch == 1 and resumed.guard_events == straight.guard_events
    for key, value in resumed_model.state_dict().items():
        torch.testing.assert_close(value, straight_model.state_dict()[key])


def deep_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def test_guard_rolls_back_an_epoch_whose_loss_rose_above_where_it_started(digits8, tmp_path):
    # SGD lr 0.6 with no warm-up: no step explodes and train accuracy stays above chance (27.6%), but the
    # first epoch's mean loss (2.57) is above the first step's (2.30): as the Hugging Face MobileNetV2
    # teacher at lr 0.05, the model only gets worse, and without the rule it ends at 32% val
    config = {"epochs": 3, "lr": 0.6, "warmup_epochs": 0, "schedule": "constant", "batch_size": 64}
    result = fit(deep_mlp(), CrossEntropyObjective(), digits8, TrainConfig(**config), tmp_path, device=CPU)
    rollbacks = [e for e in result.guard_events if e["action"] == "rollback"]
    assert rollbacks and rollbacks[0]["epoch"] == 1 and "rose above" in rollbacks[0]["reason"]
    assert rollbacks[0]["peak_lr"] == pytest.approx(0.6 * 0.3)
    assert result.epochs_run == 3 and result.best_val_accuracy > 80.0
    off = fit(deep_mlp(), CrossEntropyObjective(), digits8, TrainConfig(**config, guard={"rise_factor": None}),
              tmp_path / "off", device=CPU)
    assert off.rollbacks == 0 and off.best_val_accuracy < 50.0  # what the rule saves


class PoisonCalls(CrossEntropyObjective):
    """A loss that is NaN at the given calls (1-based) only: a run that diverges from one good epoch twice."""

    def __init__(self, calls: set[int]) -> None:
        super().__init__()
        self.poisoned, self.calls = calls, 0

    def compute(self, model: nn.Module, batch: Batch) -> LossOutput:
        self.calls += 1
        out = super().compute(model, batch)
        if self.calls in self.poisoned:
            out.total = out.total * float("nan")
        return out


def test_a_second_rollback_to_the_same_epoch_restarts_from_the_start_and_resumes_the_same_way(digits8, tmp_path):
    steps = -(-len(digits8.train) // 64)
    config = {"epochs": 3, "lr": 0.05, "warmup_epochs": 0, "schedule": "constant", "batch_size": 64}
    # epoch 2 diverges at its 3rd step, and again at the 3rd step of its retry from epoch 1
    straight_model = bn_mlp()
    straight = fit(straight_model, PoisonCalls({steps + 3, steps + 6}), digits8, TrainConfig(**config),
                   tmp_path / "straight", device=CPU)
    events = [e for e in straight.guard_events if e["action"] == "rollback"]
    assert [e["to_epoch"] for e in events] == [1, 0] and events[1].get("restart") is True
    assert events[1]["peak_lr"] == pytest.approx(0.05 * 0.3 ** 2)
    # the restarted run is a whole run at the lowered lr: epochs 1-3, none of the first attempt's
    assert [row["epoch"] for row in straight.history] == [1, 2, 3]
    assert all(row["lr"] == pytest.approx(0.05 * 0.09) for row in straight.history)
    assert straight.best_val_accuracy > 80.0
    # stopped after epoch 1, resumed: the restart reads start.pt and takes the same path
    fit(bn_mlp(), PoisonCalls(set()), digits8, TrainConfig(**{**config, "epochs": 1}), tmp_path / "resumed",
        device=CPU)
    assert (tmp_path / "resumed" / "start.pt").is_file()
    ckpt = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    ckpt["config"]["epochs"] = 3
    torch.save(ckpt, tmp_path / "resumed" / "last.pt")
    resumed_model = bn_mlp(seed=7)
    resumed = fit(resumed_model, PoisonCalls({3, 6}), digits8, TrainConfig(**config), tmp_path / "resumed",
                  device=CPU, resume=True)
    assert resumed.guard_events == straight.guard_events

    def untimed(history):
        return [{k: v for k, v in row.items() if k != "train_time_s"} for row in history]

    assert untimed(resumed.history) == untimed(straight.history)
    for key, value in resumed_model.state_dict().items():
        torch.testing.assert_close(value, straight_model.state_dict()[key])


class EvalBroken(nn.Module):
    """A user model that is fine in train mode and outputs a constant in eval mode (a mode bug)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out if self.training else out * 0.0


def test_high_train_accuracy_with_val_at_chance_recalibrates_batchnorm_or_stops(digits8, tmp_path):
    # BatchNorm momentum 1e-4 (torchvision's MobileNetV3 uses 0.01): after 2 epochs the running
    # statistics are still the initial ones and eval-mode outputs are at chance
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(16, momentum=1e-4),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(16, momentum=1e-4),
                          nn.Flatten(), nn.Linear(16 * 64, 10))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.constant_(m.bias, 200.0)  # features far from 0: the initial running mean is far off
    # precise_bn off: by default a momentum this slow has its statistics re-estimated before every validation
    # (test_batchnorm_with_a_slow_momentum_...); the guard is what catches it when that is turned off
    result = fit(model, CrossEntropyObjective(), digits8, TrainConfig(epochs=2, precise_bn=False), tmp_path,
                 device=CPU)
    recal = [e for e in result.guard_events if e["action"] == "bn_recalibration"]
    assert recal and recal[0]["val_before"] < 20.0 and recal[0]["val_after"] > 80.0
    assert result.best_val_accuracy > 80.0
    # a model broken in eval mode for another reason is stopped with an error saying so
    with pytest.raises(TrainingDivergedError, match="no BatchNorm statistics to re-estimate"):
        fit(EvalBroken(), CrossEntropyObjective(), digits8, TrainConfig(epochs=2), tmp_path / "broken", device=CPU)


def test_nan_in_the_data_is_caught_in_the_first_epoch(digits8, tmp_path):
    from torch.utils.data import TensorDataset

    from edgekd.data.bundle import DataBundle

    x = digits8.train_x.clone()
    x[7, 0, 3, 3] = float("inf")
    bad = DataBundle(train=TensorDataset(x, digits8.train_y), val=digits8.val, num_classes=10,
                     input_shape=digits8.input_shape)
    with pytest.raises(TrainingDivergedError, match="no epoch finished"):
        fit(small_mlp(), CrossEntropyObjective(), bad, TrainConfig(epochs=2), tmp_path, device=CPU)


def test_early_stopping_on_validation_accuracy(digits8, tmp_path):
    # an lr this small leaves val accuracy flat, so patience 2 stops after epoch 3
    # (the divergence guard would roll back a model stuck at chance: off here)
    config = TrainConfig(epochs=10, lr=1e-9, schedule="constant", warmup_epochs=0, early_stopping_patience=2,
                         guard={"enabled": False})
    result = fit(small_mlp(), CrossEntropyObjective(), digits8, config, tmp_path, device=CPU)
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 1


@pytest.mark.parametrize("keep", ["best_val_accuracy", "best_val_loss", "last"])
def test_keep_picks_the_epoch_by_its_rule_on_the_val_split(digits8, tmp_path, keep):
    # a constant, high lr: val top-1 and val loss move every epoch, and not together
    config = TrainConfig(epochs=5, lr=0.3, schedule="constant", warmup_epochs=0, keep=keep, guard={"enabled": False})
    model = small_mlp()
    result = fit(model, CrossEntropyObjective(), digits8, config, tmp_path, device=CPU)
    accs = [row["val_accuracy"] for row in result.history]
    losses = [row["val_loss"] for row in result.history]
    expected = {"best_val_accuracy": accs.index(max(accs)) + 1, "best_val_loss": losses.index(min(losses)) + 1,
                "last": 5}[keep]
    assert result.best_epoch == expected and result.best_val_accuracy == accs[expected - 1]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == expected
    for key, value in model.state_dict().items():  # the model ends on the kept epoch's weights
        torch.testing.assert_close(value, best["model"][key])
    if keep == "last":
        last = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, last[key])


def test_keep_rules_rank_epochs_differently():
    from edgekd.train.trainer import _keep_score

    # val top-1 peaks at epoch 2 (one lucky sample), val loss is lowest at epoch 3, the run ends at 4
    history = [(90.0, 0.40), (92.0, 0.35), (91.5, 0.30), (91.0, 0.31)]
    def kept(keep):
        scores = [_keep_score(keep, acc, loss, epoch) for epoch, (acc, loss) in enumerate(history, 1)]
        return scores.index(max(scores)) + 1  # ties keep the earlier epoch, as fit does
    assert (kept("best_val_accuracy"), kept("best_val_loss"), kept("last")) == (2, 3, 4)
    assert _keep_score("best_val_loss", 50.0, float("nan"), 1) == float("-inf")


def test_keep_last_with_early_stopping_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="early_stopping_patience"):
        TrainConfig(keep="last", early_stopping_patience=2)
    assert TrainConfig().concrete(False).keep == "best_val_accuracy"


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizers_and_grad_clip_train(digits8, tmp_path, optimizer):
    config = TrainConfig(epochs=2, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3, grad_clip=1.0,
                         label_smoothing=0.1, schedule="onecycle")
    result = fit(small_mlp(), CrossEntropyObjective(label_smoothing=0.1), digits8, config, tmp_path, device=CPU)
    assert result.best_val_accuracy > 75.0  # 2 epochs from scratch (chance: 10%)


def test_schedule_shapes():
    cfg = TrainConfig(epochs=10, warmup_epochs=1, schedule="cosine")
    f = lr_multiplier(cfg, steps_per_epoch=10)
    assert f(0) == pytest.approx(0.1) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5, abs=0.01) and f(100) == pytest.approx(0.0, abs=1e-9)
    step = lr_multiplier(TrainConfig(epochs=10, warmup_epochs=0, schedule="step", step_size=3, gamma=0.5), 10)
    assert [step(s) for s in (0, 29, 30, 60)] == [1.0, 1.0, 0.5, 0.25]
    one = lr_multiplier(TrainConfig(epochs=10, warmup_epochs=0, schedule="onecycle"), 10)
    assert one(0) == pytest.approx(1 / 25) and one(30) == pytest.approx(1.0) and one(100) == pytest.approx(1e-4)
    const = lr_multiplier(TrainConfig(epochs=2, warmup_epochs=5, schedule="constant"), 10)
    assert const(0) == pytest.approx(0.1) and const(10) == 1.0  # warm-up capped at half the run


def test_config_rejects_bad_values():
    from pydantic import ValidationError

    for bad in ({"epochs": 0}, {"lr": 0}, {"optimizer": "adam"}, {"schedule": "linear"}, {"grad_clip": -1},
                {"early_stopping_patience": 0}, {"epoch": 3}):
        with pytest.raises(ValidationError):
            TrainConfig(**bad)


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else CPU)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            resolve_device("cuda")


# -- distributed -------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, workdir: str) -> None:
    import copy

    import torch.distributed as dist

    from edgekd.data import digits_bundle
    from edgekd.train.distributed import broadcast_module_state, is_main_process, maybe_init_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert maybe_init_distributed(CPU)
    try:
        assert is_main_process() == (rank == 0)
        model = small_mlp(seed=0)
        fit(model, CrossEntropyObjective(), digits_bundle(image_size=8), TrainConfig(epochs=2, batch_size=64),
            Path(workdir) / "ddp", device=CPU, seed=0)
        torch.save(model.state_dict(), Path(workdir) / f"rank{rank}.pt")
        # a stage that ran on rank 0 only (here: a layer made narrower) reaches the other ranks
        student = copy.deepcopy(model)
        if rank == 0:
            student[1] = nn.Linear(64, 7)
            student[3] = nn.Linear(7, 10)
        broadcast_module_state(student)
        assert student[1].out_features == 7
        torch.save(student.state_dict(), Path(workdir) / f"student{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_matches_one_process(digits8, tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = small_mlp(seed=0)
    one = fit(single, CrossEntropyObjective(), digits8, TrainConfig(epochs=2, batch_size=64), tmp_path / "one",
              device=CPU, seed=0)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)  # DDP keeps ranks identical
        # the same global batches, gradients averaged over two halves: equal up to float rounding
        torch.testing.assert_close(rank0[key], value, rtol=1e-4, atol=1e-5)
    rows = list(csv.DictReader((tmp_path / "ddp" / "metrics.csv").open()))
    assert len(rows) == 2  # written once, by rank 0
    assert float(rows[-1]["val_accuracy"]) == pytest.approx(one.history[-1]["val_accuracy"], abs=0.5)
    s0 = torch.load(tmp_path / "student0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "student1.pt", weights_only=True)
    for key in s0:
        torch.testing.assert_close(s0[key], s1[key], rtol=0, atol=0)


def test_a_last_batch_of_one_sample_is_merged_so_batchnorm_trains(digits8, tmp_path):
    from torch.utils.data import TensorDataset

    from edgekd.data.bundle import DataBundle
    from edgekd.train.trainer import epoch_batches

    # 2 x 32 + 1 training samples: cut plainly, the last batch holds one sample, and BatchNorm1d after
    # a Linear (or after global pooling: Hugging Face EfficientNet, MobileNetV1, LeViT) raises
    # "Expected more than 1 value per channel when training"
    n = 65
    data = DataBundle(train=TensorDataset(digits8.train_x[:n], digits8.train_y[:n]), val=digits8.val,
                      num_classes=10, input_shape=digits8.input_shape)
    batches = epoch_batches(n, 32, epoch=1, seed=0)
    assert [len(b) for b in batches] == [32, 33]
    assert sorted(torch.cat(batches).tolist()) == list(range(n))  # every sample still seen once an epoch
    assert [len(b) for b in epoch_batches(64 + 5, 32, epoch=1, seed=0)] == [32, 32, 5]  # others as they were
    result = fit(bn_mlp(), CrossEntropyObjective(), data, TrainConfig(epochs=2, batch_size=32), tmp_path, device=CPU)
    assert result.epochs_run == 2 and len(result.history) == 2


def test_batchnorm_that_keeps_only_the_last_batch_is_validated_with_precise_statistics(digits8, tmp_path):
    # momentum 0.997 (Hugging Face MobileNetV2: TensorFlow's decay given as PyTorch's momentum) leaves the running
    # statistics those of the last batch, here 3 samples (1169 = 22 x 53 + 3); the trainer re-estimates them
    # from training batches before validating, so the model that is kept and handed on carries them
    def net(momentum: float) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16, momentum=momentum), nn.ReLU(),
                             nn.Flatten(), nn.Linear(16 * 64, 10))

    assert len(digits8.train) % 53 == 3

    def mean_error(model: nn.Module) -> float:
        with torch.no_grad():
            exact = model[0](digits8.train_x).mean(dim=(0, 2, 3))
        return float((model[1].running_mean - exact).abs().max())

    errors = {}
    for precise in (None, False):
        model = net(0.997)
        result = fit(model, CrossEntropyObjective(), digits8, TrainConfig(epochs=1, batch_size=53, precise_bn=precise),
                     tmp_path / str(precise), device=CPU)
        assert (result.history[0].get("precise_bn_batches") == 16) == (precise is None)
        errors[precise] = mean_error(model)
    assert errors[None] < errors[False] / 3  # statistics of 16 x 53 samples, not of the last 3
    usual = fit(net(0.1), CrossEntropyObjective(), digits8, TrainConfig(epochs=1), tmp_path / "usual", device=CPU)
    assert "precise_bn_batches" not in usual.history[0]  # an ordinary momentum is left alone by default


def test_batchnorm_with_a_slow_momentum_is_validated_with_precise_statistics(digits8, tmp_path):
    # momentum 0.01 (torchvision's MobileNetV3 / EfficientNet) or None (a cumulative average): after one short
    # epoch the running statistics still lean on their initial values (mean 0, var 1), not on the trained conv
    for momentum in (0.01, None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16, momentum=momentum), nn.ReLU(),
                              nn.Flatten(), nn.Linear(16 * 64, 10))
        result = fit(model, CrossEntropyObjective(), digits8, TrainConfig(epochs=1), tmp_path / str(momentum),
                     device=CPU)
        assert result.history[0].get("precise_bn_batches") == 16
        with torch.no_grad():
            exact = model[0](digits8.train_x).mean(dim=(0, 2, 3))
        assert float((model[1].running_mean - exact).abs().max()) < 0.05 * float(exact.abs().max())


def test_channels_last_training_learns_and_hands_the_model_on_in_the_usual_layout(digits8, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10))
    plain = copy.deepcopy(model)
    result = fit(model, CrossEntropyObjective(), digits8, TrainConfig(epochs=2, channels_last=True), tmp_path, device=CPU)
    usual = fit(plain, CrossEntropyObjective(), digits8, TrainConfig(epochs=2), tmp_path / "plain", device=CPU)
    # the same training in another memory layout: float rounding differs, what is learned does not
    assert result.best_val_accuracy > 80.0 and abs(result.best_val_accuracy - usual.best_val_accuracy) < 3.0
    for conv in (model[0], model[3]):
        assert conv.weight.is_contiguous()  # NCHW again: export and pruning see what they expect
    # the kept checkpoint loads into a plain model
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(torch.load(result.checkpoint, weights_only=True)["model"])


def test_the_mean_loss_rule_judges_only_training_from_random_weights():
    """From random weights an epoch whose mean loss rose above 1.05 x max(first loss, ln C) is rolled back; from
    trained weights the first loss is one batch of a trained model, not a scale (a distilled MobileNetV2: 3.97 on
    its first batch, 5.1-5.8 as epoch means at every lr), and the epoch is judged by its val drop instead."""
    guard = GuardConfig()
    rising = {"train_loss": 5.4, "reference_loss": 3.97, "val_samples": 269}
    assert "rose above" in epoch_problem(60.0, 60.0, 62.0, 10, guard, **rising)
    assert epoch_problem(60.0, 60.0, 62.0, 10, guard, from_weights=True, **rising) is None
    # the val drop from the start still counts from trained weights
    assert "fell to" in epoch_problem(60.0, 30.0, 62.0, 10, guard, from_weights=True, **rising)
