"""The kinds of ../shared/cases/ (issue 13) that no other test file covers with a test failing on ef01e24.

Covered elsewhere: grouped convolutions and GroupNorm, weight norm, split sizes stored as ints
(tests/test_prune_kinds.py, tests/test_zoo.py), train-mode tuples and a bare squeeze
(tests/test_outputs.py, tests/test_zoo.py), rfft in a .pte (tests/test_export.py). Here: a
``torch.split`` / ``.chunk`` on the channel axis in a ``.pte``. ExecuTorch's
``split_with_sizes_copy`` kernel cannot resize its outputs, so such a file ran only at the batch it
was exported with (2) and was set aside as failed; partial_conv.yaml lost its .pte that way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgekd.export.executorch_export import export_pte
from edgekd.export.parity import check_batch_sizes
from edgekd.runtimes.registry import get_runtime
from tests.training import train_briefly

pytest.importorskip("executorch")


class PartialConvNet(nn.Module):
    """A partial convolution (FasterNet's): the first quarter of the channels is convolved, the rest passes;
    the split sizes are ints computed at construction."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.sizes = [width // 4, width - width // 4]
        self.partial = nn.Conv2d(width // 4, width // 4, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        part, rest = torch.split(self.stem(x), self.sizes, dim=1)
        y = torch.cat((self.partial(part), rest), dim=1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class ChunkGateNet(nn.Module):
    """A gated conv whose channels are chunked in two (GLU-style), the other form of a channel split."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(x).chunk(2, dim=1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(a * torch.sigmoid(b), 1), 1))


@pytest.mark.parametrize("factory", [PartialConvNet, ChunkGateNet])
def test_a_channel_split_pte_runs_every_batch_size_with_parity(factory, digits8, tmp_path: Path):
    torch.manual_seed(0)
    model = factory()
    train_briefly(model, digits8, torch.optim.Adam(model.parameters(), lr=1e-2), 1)
    model.eval()
    facts = export_pte(model, digits8.example_batch(2), tmp_path / "m.pte")
    # the split became slices (data movement, counted apart), so every compute operator is in XNNPACK
    assert facts["delegated_share"] == 1.0 and facts["warnings"] == []
    assert facts["layout_ops"].get("aten_slice_copy_tensor", 0) >= 2
    loaded = get_runtime("executorch").load(tmp_path / "m.pte", threads=1)
    x = digits8.val_tensors(64)[0]
    # before the rewrite: "Attempted to resize a static tensor" at every batch but 2
    rows = check_batch_sizes(model, loaded, x, [1, 3, 64], atol=1e-4, rtol=1e-4, label="split",
                             declared_max_batch=256)
    assert [r["batch"] for r in rows] == [1, 3, 64]
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(loaded.run(x.numpy()) - expected).max() < 1e-4
    del loaded


def test_a_student_pruned_to_chance_is_flagged_where_the_report_shows_its_accuracy():
    """grouped_conv.yaml: 12.3% val after pruning (chance 10%); prune.json said alive: false with a note
    (prune in steps, lower the ratio, ...), but the report showed a bare 12.27% and the console nothing."""
    from edgekd.report.stage_tables import prune_steps_table

    note = ("the pruned student is at chance (12.3% vs 10.0%) after BatchNorm recalibration: too much was cut at "
            "once, or a cut broke a coupling the tracer missed")
    prune = {"alive": {"alive": False, "finite": True, "val_accuracy": 12.268, "chance_accuracy": 10.0, "note": note},
             "steps": [{"step": 1, "channel_ratio": 0.5, "params": 6298, "macs": 758090, "val_accuracy": 12.268,
                        "alive": False, "finite": True}]}
    table = prune_steps_table(prune, "0-prune")
    assert f"warning: {note}" in table.caption
    assert table.rows[0][4] == "12.27% (chance)"
    prune["alive"] = {"alive": True, "finite": True, "val_accuracy": 61.0, "note": ""}
    prune["steps"][0].update(alive=True, val_accuracy=61.0)
    table = prune_steps_table(prune, "0-prune")
    assert "warning" not in table.caption and table.rows[0][4] == "61.00%"
