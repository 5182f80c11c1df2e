"""Built-in models, user factories, the output adapter and checkpoints."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from edgekd.errors import ModelError
from edgekd.models import BUILTIN_MODELS, LogitsAdapter, ModelSpec
from edgekd.models.checkpoint import load_checkpoint, save_state_dict
from edgekd.models.portable import load_portable, save_portable


@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_builtin_forward_and_backward(name):
    shape = BUILTIN_MODELS[name].example_shape
    model = ModelSpec(model=name).build(7, shape)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_mobilenet_width_multiplier_shrinks():
    small = ModelSpec(model="mobilenetv2", kwargs={"width_mult": 0.5}).build(10, (3, 16, 16))
    big = ModelSpec(model="mobilenetv2").build(10, (3, 16, 16))
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in big.parameters())


@pytest.mark.parametrize("factory", ["tests.factories:dict_net", "tests.factories:hf_net"])
def test_user_factory_outputs_are_adapted(factory):
    model = ModelSpec(factory=factory).build(4, (1, 8, 8))
    assert isinstance(model, LogitsAdapter)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)


def test_bad_factory_and_kwargs():
    with pytest.raises(ModelError, match="no attribute"):
        ModelSpec(factory="tests.factories:nope").build(10, (1, 8, 8))
    with pytest.raises(ModelError, match="cannot import"):
        ModelSpec(factory="no_such_pkg.mod:f").build(10, (1, 8, 8))
    with pytest.raises(ModelError, match="bad arguments"):
        ModelSpec(model="resnet20", kwargs={"colour": 3}).build(10, (1, 8, 8))


def test_checkpoint_round_trip_and_mismatch_by_layer(tmp_path):
    model = ModelSpec(model="resnet20").build(10, (1, 8, 8)).eval()
    save_state_dict(model, tmp_path / "t.pt")
    clone = ModelSpec(model="resnet20").build(10, (1, 8, 8)).eval()
    load_checkpoint(clone, tmp_path / "t.pt")
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model(x), clone(x))
    other = ModelSpec(model="resnet20").build(5, (1, 8, 8))
    with pytest.raises(ModelError, match=r"fc.weight: checkpoint \(10, 64\) vs model \(5, 64\)"):
        load_checkpoint(other, tmp_path / "t.pt")


def test_pickled_model_checkpoint_is_refused(tmp_path):
    model = ModelSpec(model="mlp").build(10, (1, 40))
    torch.save(model, tmp_path / "pickled.pt")  # a whole pickled module, not a state dict
    with pytest.raises(ModelError, match="weights_only=True"):
        load_checkpoint(model, tmp_path / "pickled.pt")


def test_portable_round_trip_in_fresh_process(tmp_path, digits8):
    import torch_pruning as tp

    model = ModelSpec(model="resnet20").build(10, (1, 8, 8)).eval()
    x = digits8.val_x[:4]
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.5, ignored_layers=[model.fc])
    pruner.step()
    save_portable(model, tmp_path / "p.pt", spec=ModelSpec(model="resnet20"), num_classes=10, input_shape=(1, 8, 8))
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x).detach(), tmp_path / "y.pt")
    code = (
        "import torch; from edgekd.models.portable import load_portable; "
        f"m, meta = load_portable(r'{tmp_path / 'p.pt'}'); x = torch.load(r'{tmp_path / 'x.pt'}', weights_only=True); "
        f"y = torch.load(r'{tmp_path / 'y.pt'}', weights_only=True); assert torch.allclose(m(x), y, atol=1e-6); "
        "print(m.conv1.out_channels)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) == 8
    again, meta = load_portable(tmp_path / "p.pt")
    assert meta["input_shape"] == (1, 8, 8)


def test_portable_rejects_plain_state_dict(tmp_path):
    model = ModelSpec(model="mlp").build(10, (1, 40))
    save_state_dict(model, tmp_path / "sd.pt")
    with pytest.raises(ModelError, match="not an edgekd portable model"):
        load_portable(tmp_path / "sd.pt")
