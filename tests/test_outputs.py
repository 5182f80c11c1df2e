"""Model outputs as the pipeline uses them: the main logits in training AND eval mode, and the batch axis
kept at every batch size (issue 13).

The models here are user models of the kinds users bring (factories named like a user's package:
``tests.test_outputs:<name>``): deep supervision that returns ``(logits, aux_logits)`` only in
training mode, a Hugging Face style ``ModelOutput`` and a dict whose training-mode extras come
first, and a classifier that flattens pooled features with a bare ``.squeeze()``.
"""

from __future__ import annotations

import inspect
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgekd.errors import ModelError, RecipeError
from edgekd.models.adapter import LogitsAdapter, check_batch_axis
from edgekd.models.spec import ModelSpec


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class AuxHeadNet(nn.Module):
    """Training mode: ``(logits, aux_logits)``; eval mode: the logits alone (GoogLeNet/Inception style)."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.block1 = _conv_bn(1, width)
        self.aux = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
        self.block2 = _conv_bn(width, 2 * width, stride=2)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        mid = self.block1(x)
        logits = self.fc(self.drop(torch.flatten(F.adaptive_avg_pool2d(self.block2(mid), 1), 1)))
        return (logits, self.aux(mid)) if self.training else logits


class _Output(dict):
    """A Hugging Face ``ModelOutput`` in miniature: a dict whose keys are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ExtrasFirstNet(AuxHeadNet):
    """Training mode: a dict whose first entries are the pooled embedding and the auxiliary head
    (neither called "logits"), the main head last; eval mode: a ModelOutput-like object with ``.logits``."""

    def forward(self, x):
        mid = self.block1(x)
        embedding = torch.flatten(F.adaptive_avg_pool2d(self.block2(mid), 1), 1)
        logits = self.fc(embedding)
        if self.training:
            return {"embedding": embedding, "aux": self.aux(mid)[:, :3], "out": logits}
        return _Output(logits=logits)


class SqueezeNet(nn.Module):
    """Pooled features flattened with a bare ``.squeeze()``: a batch of one loses its batch axis."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(_conv_bn(1, width), _conv_bn(width, width, stride=2))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        pooled = F.adaptive_avg_pool2d(self.features(x), 1).squeeze()
        return self.fc(pooled)


def aux_head_net(num_classes=10, width=8) -> nn.Module:
    return AuxHeadNet(num_classes, width)


def extras_first_net(num_classes=10, width=8) -> nn.Module:
    return ExtrasFirstNet(num_classes, width)


def squeeze_net(num_classes=10, width=8) -> nn.Module:
    return SqueezeNet(num_classes, width)


def test_a_model_with_train_mode_aux_outputs_trains_on_its_main_head(digits8, tmp_path):
    from edgekd.train.config import TrainConfig
    from edgekd.train.objectives import CrossEntropyObjective
    from edgekd.train.trainer import fit

    torch.manual_seed(0)
    spec = ModelSpec(factory="tests.test_outputs:aux_head_net")
    model = spec.build(digits8.num_classes, digits8.input_shape)
    # the eval-mode forward alone returns a tensor: the train-mode probe is what finds the tuple
    assert isinstance(model, LogitsAdapter) and model.sample_shape == (10,)
    x = digits8.val_tensors(16)[0]
    # probing training mode left no trace: BatchNorm statistics and the dropout RNG are untouched
    torch.manual_seed(0)
    twin = aux_head_net()
    assert all(torch.equal(a, b) for a, b in zip(model.model.state_dict().values(), twin.state_dict().values(), strict=True))
    torch.manual_seed(5)
    expected = twin.train()(x)[0]
    torch.manual_seed(5)
    got = model.train()(x)
    assert got.shape == (16, 10) and torch.equal(got, expected)  # the main head, dropout draws and all
    result = fit(model, CrossEntropyObjective(), digits8, TrainConfig(epochs=4, lr=0.1, warmup_epochs=0), tmp_path,
                 device=torch.device("cpu"), label="teacher")
    assert result.epochs_run == 4 and result.best_val_accuracy > 60.0  # it learned (chance is 10%)
    # the eval path is the one exported
    from edgekd.export.onnx_export import export_onnx
    from edgekd.runtimes.registry import get_runtime

    model.eval()
    export_onnx(model, digits8.example_batch(2), tmp_path / "aux.onnx")
    loaded = get_runtime("onnxruntime").load(tmp_path / "aux.onnx", threads=1)
    np.testing.assert_allclose(loaded.run(x.numpy()), model.model(x).detach().numpy(), atol=1e-4)


def test_the_main_head_is_found_among_train_mode_extras_by_the_eval_logits_shape(digits8):
    model = ModelSpec(factory="tests.test_outputs:extras_first_net").build(10, digits8.input_shape)
    x = digits8.val_tensors(8)[0]
    torch.manual_seed(1)
    train_logits = model.train()(x)
    torch.manual_seed(1)
    assert torch.equal(train_logits, model.model(x)["out"])  # not the embedding, not the 3-class aux head
    model.eval()
    assert torch.equal(model(x), model.model(x).logits)


class DepthOrderedAuxNet(nn.Module):
    """Training mode: ``{"aux": ..., "out": ...}`` ordered by depth (the aux head comes first and has the main
    head's shape); eval mode: the logits tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.aux = nn.Linear(8, 10)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor):
        features = self.body(x)
        return {"aux": self.aux(features), "out": self.fc(features)} if self.training else self.fc(features)


def depth_ordered_aux_net(num_classes: int = 10, input_shape=(1, 8, 8)) -> nn.Module:
    return DepthOrderedAuxNet()


@pytest.mark.parametrize("keys", [("aux", "out"), ("aux_logits", "main"), ("aux1", "head")])
def test_a_dict_whose_aux_head_comes_first_trains_its_main_head(digits8, keys):
    """The first tensor of the right shape was the aux head: the teacher trained it while eval mode ran the untrained
    main head (train accuracy 97%, val 12% in a user's trial). Main-head keys win, then any key not naming aux."""
    from edgekd.models.adapter import logits_of

    aux_key, main_key = keys
    x = digits8.val_tensors(4)[0]
    out = {aux_key: torch.zeros(4, 10), main_key: torch.ones(4, 10)}
    assert torch.equal(logits_of(out, (10,)), out[main_key])
    assert torch.equal(logits_of(out), out[main_key])
    model = ModelSpec(factory="tests.test_outputs:depth_ordered_aux_net").build(10, digits8.input_shape)
    model.train()
    assert torch.equal(model(x), model.model.fc(model.model.body(x)))


def test_validate_refuses_a_bare_squeeze_naming_the_module_the_call_and_the_line(tmp_path):
    from edgekd.pipeline.validate import validate_document
    from edgekd.recipe.load import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent("""\
        name: squeeze
        data: {dataset: digits, image_size: 8}
        teacher:
          factory: tests.test_outputs:squeeze_net
          train: {epochs: 1}
        stages:
          - export: {formats: [onnx]}
        """))
    with pytest.raises(RecipeError) as info:
        validate_document(load_recipe(path))
    err = info.value
    line = inspect.getsourcelines(SqueezeNet.forward)[1] + 1
    assert err.exit_code == 2 and err.key == "teacher" and err.line == 3
    assert "batch 1: (10,), batch 2: (2, 10), batch 3: (3, 10)" in err.message
    assert "the model's own forward (SqueezeNet)" in err.message
    assert f"Tensor.squeeze (test_outputs.py:{line}" in err.message and "gives (8,) for one sample" in err.message
    assert "torch.flatten(x, 1)" in err.hint


def test_a_squeeze_inside_a_submodule_is_named_by_its_path():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x.mean((2, 3), keepdim=True).squeeze())

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), Head()).eval()
    with pytest.raises(ModelError, match=r"it is lost in `2` \(Head\), at Tensor.squeeze \(test_outputs.py"):
        check_batch_axis(model, torch.randn(2, 1, 6, 6))
    fixed = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    check_batch_axis(fixed, torch.randn(2, 1, 6, 6))  # keeps (N, 3) at 1, 2 and 3: no error
