"""Hostile input: a file handed to edgekd is data and never chooses code to run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgekd.errors import ModelError
from edgekd.models.portable import FORMAT, load_portable, save_portable, trusted_factories
from edgekd.models.spec import ModelSpec

REPO = Path(__file__).resolve().parents[1]


def _hostile_checkpoint(path: Path, marker: Path, *, swaps: dict | None = None) -> None:
    """A portable checkpoint (a plain dict, loads with weights_only=True) whose spec names os:system."""
    payload = {
        "format": FORMAT,
        "spec": {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}},
        "num_classes": 10,
        "input_shape": [1, 8, 8],
        "swaps": swaps or {},
        "structure": {},
        "state_dict": {},
        "extra": {},
    }
    torch.save(payload, path)


def test_hostile_checkpoint_runs_nothing_in_library(tmp_path):
    marker = tmp_path / "pwned"
    _hostile_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(ModelError, match=r"factory 'os:system'.*does not run code") as info:
        load_portable(tmp_path / "evil.pt")
    assert "--factory os:system" in info.value.hint
    assert not marker.exists()


@pytest.mark.parametrize("command", [["benchmark"], ["export", "--to", "onnx"]])
def test_hostile_checkpoint_runs_nothing_from_cli(tmp_path, command):
    marker = tmp_path / "pwned"
    _hostile_checkpoint(tmp_path / "evil.pt", marker)
    argv = [sys.executable, "-m", "edgekd", command[0], str(tmp_path / "evil.pt"), *command[1:]]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    assert "os:system" in proc.stderr and "--factory" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_swap_outside_the_fixed_list_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload_path = tmp_path / "swap.pt"
    model = ModelSpec(model="mlp").build(10, (1, 40))
    save_portable(model, payload_path, spec=ModelSpec(model="mlp"), num_classes=10, input_shape=(1, 40))
    payload = torch.load(payload_path, weights_only=True)
    payload["swaps"] = {"net.0": "edgekd.fileio:os"}  # an edgekd module, but not a swappable class
    torch.save(payload, payload_path)
    with pytest.raises(ModelError, match="not one of edgekd's swappable modules"):
        load_portable(payload_path)
    assert not marker.exists()


def test_factory_checkpoint_loads_only_when_named(tmp_path):
    spec = ModelSpec(factory="tests.factories:dict_net")
    model = spec.build(10, (1, 8, 8)).eval()
    save_portable(model, tmp_path / "user.pt", spec=spec, num_classes=10, input_shape=(1, 8, 8))
    with pytest.raises(ModelError, match="tests.factories:dict_net"):
        load_portable(tmp_path / "user.pt")
    x = torch.randn(3, 1, 8, 8)
    again, _ = load_portable(tmp_path / "user.pt", factories=["tests.factories:dict_net"])
    torch.testing.assert_close(again(x), model(x))
    with trusted_factories(["tests.factories:dict_net"]):  # as the runner does for its recipe's factories
        load_portable(tmp_path / "user.pt")
    with pytest.raises(ModelError):  # the trust ends with the block
        load_portable(tmp_path / "user.pt")
