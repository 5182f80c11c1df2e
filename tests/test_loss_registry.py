"""The distillation-loss registry: every registered loss kind runs on a tiny real teacher/student pair
(real digits, real conv nets) and gives a finite loss whose gradients reach the student; the recipe's
union, its JSON Schema, its errors and the objective's dispatch all come from ``LOSSES``."""

from __future__ import annotations

import textwrap
from typing import Literal

import pytest
import torch
from pydantic import Field
from torch import nn

from edgekd.config_base import StrictModel
from edgekd.distill.config import LOSSES, DistillConfig, KDTerm, LossEntry
from edgekd.distill.losses import TermInputs, TermLoss, TermValue
from edgekd.distill.objective import DistillObjective
from edgekd.errors import RecipeError
from edgekd.recipe.load import load_recipe
from edgekd.train.objectives import Batch

CPU = torch.device("cpu")


class TinyConvNet(nn.Module):
    """(N, 1, 8, 8) -> (N, 10); ``features`` gives (N, width, 4, 4), the layer the feature terms read."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * 16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def example_term(entry: LossEntry):
    """The entry's term with its defaults; layer fields point at ``features`` in both models."""
    layers = {f: "features" for f in ("student_layer", "teacher_layer") if f in entry.config.model_fields}
    return entry.config.model_validate({"kind": entry.name, **layers})


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_kind_gives_a_finite_loss_with_gradients(name, digits8):
    entry = LOSSES[name]
    torch.manual_seed(0)
    teacher, student = TinyConvNet(width=8), TinyConvNet(width=4)  # channels differ: hint needs its adaptor
    objective = DistillObjective(teacher, [example_term(entry)], cache=False)
    objective.setup(student, digits8, CPU)
    try:
        batch = Batch(x=digits8.train_x[:32], y=digits8.train_y[:32], index=torch.arange(32))
        out = objective.compute(student, batch)
        assert out.total.dim() == 0 and torch.isfinite(out.total)
        assert out.total.item() > 0.0  # untrained student against a different random teacher
        assert out.parts and all(torch.isfinite(v) for v in out.parts.values())
        out.total.backward()
        grads = [p.grad for p in student.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
        assert all(p.grad is None for p in teacher.parameters())  # the teacher stays frozen
        for module in objective.adaptors.values():  # trained with the student (hint's 1x1 conv)
            assert all(p.grad is not None for p in module.parameters())
        # hard-label CE is in the total: from the term itself (hard_labels) or added by the objective
        assert "ce" in out.parts
    finally:
        objective.teardown()


def test_recipe_union_and_schema_list_every_registered_kind():
    schema = DistillConfig.model_json_schema()
    mapping = schema["properties"]["losses"]["items"]["discriminator"]["mapping"]
    assert set(mapping) == set(LOSSES)
    for name in LOSSES:
        term = DistillConfig(losses=[example_term(LOSSES[name]).model_dump()]).losses[0]
        assert isinstance(term, LOSSES[name].config)


def test_unknown_loss_kind_names_file_line_key_and_valid_kinds(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent("""\
        name: t
        data: {dataset: digits, image_size: 8}
        teacher: {model: resnet20, train: {epochs: 1}}
        stages:
          - distill:
              epochs: 1
              losses:
                - {kind: kd}
                - kind: hnit
        """))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    err = info.value
    assert err.file.endswith("recipe.yaml") and err.line == 9
    assert err.key.endswith("losses.1.kind") and "hnit" in str(err)
    assert all(name in err.hint for name in LOSSES)


def test_at_most_one_comes_from_the_entry():
    with pytest.raises(ValueError, match="at most one kd term"):
        DistillConfig(losses=[{"kind": "kd"}, {"kind": "kd", "weight": 2.0}])


def test_entry_kind_must_match_its_config():
    class Mismatched(StrictModel):
        kind: Literal["other"]

    with pytest.raises(ValueError, match="Literal"):
        LossEntry("mine", Mismatched, TermLoss, "mismatched")


class _L2Term(StrictModel):
    kind: Literal["l2logits"]
    weight: float = Field(1.0, ge=0.0)


class _L2Loss(TermLoss):
    def __call__(self, inputs: TermInputs) -> TermValue:
        loss = (inputs.student_logits - inputs.teacher_logits).pow(2).mean()
        return loss, {f"l2logits{self.index}": loss.detach()}


def test_a_new_entry_is_all_the_objective_needs(monkeypatch, digits8):
    """Dispatch reads the registry: an entry the objective has never seen runs with no other edit."""
    entries = dict(LOSSES._entries)
    entries["l2logits"] = LossEntry("l2logits", _L2Term, _L2Loss, "squared logit distance")
    monkeypatch.setattr(LOSSES, "_entries", entries)
    torch.manual_seed(0)
    teacher, student = TinyConvNet(8), TinyConvNet(4)
    objective = DistillObjective(teacher, [_L2Term(kind="l2logits"), KDTerm(kind="kd")], cache=False)
    objective.setup(student, digits8, CPU)
    try:
        batch = Batch(x=digits8.train_x[:16], y=digits8.train_y[:16], index=torch.arange(16))
        out = objective.compute(student, batch)
    finally:
        objective.teardown()
    with torch.no_grad():
        expected = (student(batch.x) - teacher(batch.x)).pow(2).mean()
    assert out.parts["l2logits0"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert {"kd_soft", "ce"} <= set(out.parts)
