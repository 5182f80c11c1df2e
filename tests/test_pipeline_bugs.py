"""Issue 15's bugs at the joints between stages: each test failed before its fix."""

from __future__ import annotations

import json

import pytest
import torch

from edgekd.data import load_data
from edgekd.data.config import DigitsData
from edgekd.data.transfer import keep_labels
from edgekd.distill.config import DistillConfig
from edgekd.distill.hooks import resolve_layer as distill_resolve
from edgekd.distill.stage import check_distill_layers
from edgekd.models.adapter import LogitsAdapter
from edgekd.models.spec import ModelSpec
from edgekd.prune.pruner import missing_layers
from edgekd.prune.pruner import resolve_layer as prune_resolve
from edgekd.train.config import TrainConfig
from edgekd.train.objectives import CrossEntropyObjective
from edgekd.train.trainer import fit


def _training_batches(model: torch.nn.Module) -> list[int]:
    """Record the batch size of every training-mode forward of ``model``."""
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]) if m.training else None)
    return sizes


def test_data_batch_size_is_the_training_batch_when_the_train_block_sets_none(tmp_path):
    """``data.batch_size`` reaches the trainer (it was ignored: every run trained on batches of 64)."""
    data = load_data(DigitsData(dataset="digits", image_size=8, batch_size=40), seed=0)
    assert data.batch_size == 40 and data.describe()["batch_size"] == 40
    # the distill stage's transfer copy of the data keeps it too
    assert keep_labels(data, 0.5, seed=0).batch_size == 40
    model = ModelSpec(model="mlp", kwargs={"hidden": 16}).build(data.num_classes, data.input_shape)
    sizes = _training_batches(model)
    fit(model, CrossEntropyObjective(), data, TrainConfig(epochs=1, guard={"enabled": False}), tmp_path / "a",
        device=torch.device("cpu"))
    assert max(sizes) == 40 and sizes.count(40) == len(data.train) // 40
    # a train block's own batch_size still wins
    model = ModelSpec(model="mlp", kwargs={"hidden": 16}).build(data.num_classes, data.input_shape)
    sizes = _training_batches(model)
    fit(model, CrossEntropyObjective(), data, TrainConfig(epochs=1, batch_size=100, guard={"enabled": False}),
        tmp_path / "b", device=torch.device("cpu"))
    assert max(sizes) == 100


@pytest.mark.parametrize("factory", ["tests.factories:dict_net", "tests.factories:hf_net"])
def test_distill_and_prune_resolve_layer_names_alike(factory):
    """A model whose forward returns a dict or an object with ``.logits`` is wrapped in ``LogitsAdapter``
    (its modules gain ``model.``): the names the user writes resolve to the same modules in prune and in
    distill's hint/attention losses (distill refused them: "the student has no layer 'conv'")."""
    teacher = ModelSpec(factory=factory).build(10, (1, 8, 8))
    student = ModelSpec(factory=factory, kwargs={"width": 8} if "dict" in factory else {}).build(10, (1, 8, 8))
    assert isinstance(teacher, LogitsAdapter)
    for name in ("conv", "bn", "head"):
        assert distill_resolve(teacher, name) is prune_resolve(teacher, name) is teacher.model.get_submodule(name)
    assert missing_layers(teacher, ["conv", "nope"]) == ["nope"]
    config = DistillConfig(losses=[{"kind": "kd"}, {"kind": "hint", "student_layer": "conv", "teacher_layer": "conv"},
                                   {"kind": "attention", "student_layer": "bn", "teacher_layer": "bn"}])
    check_distill_layers(config, teacher, student, torch.randn(2, 1, 8, 8))
    with pytest.raises(Exception, match="no layer 'cnv'") as err:
        distill_resolve(student, "cnv", role="student")
    assert "'conv'" in err.value.hint and "model." not in err.value.hint



def test_the_report_evaluates_the_gate_once_and_refuses_a_damaged_one(tmp_path):
    """The gate is evaluated in one place, ``build_report``: with the running recipe's gate when the runner
    passes it, else the one the manifest recorded; a gate section that does not validate is an error naming
    the file (it was dropped silently, leaving a report without its gate)."""
    from edgekd.errors import ConfigError
    from edgekd.report.build import build_report
    from edgekd.report.config import GateConfig

    manifest = {"name": "r", "stages": [], "teacher": {"test_accuracy": 90.0},
                "ledger": [{"stage": "distill", "test_accuracy": 88.5}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "recipe.yaml").write_text("gate:\n  max_accuracy_drop: lots\n")
    with pytest.raises(ConfigError, match="recipe.yaml: gate"):
        build_report(tmp_path)
    report = build_report(tmp_path, GateConfig(max_accuracy_drop=1.0))
    assert report.gate is not None and not report.gate.passed and report.gate.worst.drop == pytest.approx(1.5)
    # a run of this version records its gate in the manifest; the report reads it from there
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "gate": {"max_accuracy_drop": 2.0}}))
    assert build_report(tmp_path).gate.passed


def test_a_hugging_face_model_resolves_the_same_layer_names_in_prune_and_distill():
    """A real transformers ResNet (small config, built offline) returns ``ImageClassifierOutput``: wrapped in
    ``LogitsAdapter``, its module paths as the user prints them from the HF model work in both places."""
    teacher = ModelSpec(factory="tests.zoo_models:hf_resnet").build(10, (1, 32, 32))
    student = ModelSpec(factory="tests.zoo_models:hf_resnet").build(10, (1, 32, 32))
    assert isinstance(teacher, LogitsAdapter)
    names = ["resnet.embedder", "resnet.encoder.stages.1", "resnet.encoder.stages.2.layers.0"]
    assert set(names) <= {n for n, _ in teacher.model.named_modules()}
    for name in names:
        assert distill_resolve(teacher, name) is prune_resolve(teacher, name) is teacher.model.get_submodule(name)
    config = DistillConfig(losses=[
        {"kind": "kd"},
        {"kind": "hint", "student_layer": names[1], "teacher_layer": names[1]},
        {"kind": "attention", "student_layer": names[2], "teacher_layer": names[2]}])
    check_distill_layers(config, teacher, student, torch.randn(2, 1, 32, 32))
