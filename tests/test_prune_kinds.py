"""Pruning the kinds of models users bring (issue 13): grouped convs with BatchNorm/GroupNorm, weight
norm, split sizes stored as ints, channel shuffle, gates, Hugging Face and fused-qkv attention, and
train-mode auxiliary heads. Each model is small, written here (no one's code), and pruned 50% with
round_to 8 as a recipe would; the pruned model must run at batch 1 and 5 with the same logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgekd.prune.stage  # noqa: F401  (registers the stage)
from edgekd.errors import ModelError, RecipeError
from edgekd.models.fold import fold_weight_norm
from edgekd.models.portable import load_portable, save_portable
from edgekd.models.spec import ModelSpec
from edgekd.prune.config import PruneConfig
from edgekd.prune.pruner import kept_whole_rows, layer_widths
from edgekd.prune.targets import PruneEnv, prune_at_ratio
from edgekd.stage.base import stage_for
from edgekd.stage.context import ValidationContext

HERE = "tests.test_prune_kinds"


# -- the models ---------------------------------------------------------------------------------
class GroupedNet(nn.Module):
    """A bottleneck whose 3x3 conv has groups=4 (neither plain nor depthwise)."""

    def __init__(self, num_classes: int = 10, norm: str = "bn") -> None:
        super().__init__()

        def norm_layer(c):
            return nn.GroupNorm(4, c) if norm == "gn" else nn.BatchNorm2d(c)

        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.reduce, self.n1 = nn.Conv2d(32, 32, 1, bias=False), norm_layer(32)
        self.grouped, self.n2 = nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False), norm_layer(32)
        self.expand, self.n3 = nn.Conv2d(32, 32, 1, bias=False), norm_layer(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu(self.n1(self.reduce(x)))
        y = F.relu(self.n2(self.grouped(y)))
        y = F.relu(self.n3(self.expand(y)) + x)
        return self.fc(y.mean((2, 3)))


class TCN(nn.Module):
    """Conv1d layers under weight normalisation (hook or parametrization form)."""

    def __init__(self, num_classes: int = 10, style: str = "hook") -> None:
        super().__init__()
        wn = nn.utils.weight_norm if style == "hook" else nn.utils.parametrizations.weight_norm
        with pytest.warns(FutureWarning) if style == "hook" else _nothing():
            self.c1, self.c2 = wn(nn.Conv1d(1, 32, 3, padding=1)), wn(nn.Conv1d(32, 32, 3, padding=2, dilation=2))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).mean(2))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class PartialConv(nn.Module):
    """Convolves the first quarter of the channels; the split sizes are ints kept on the module."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim_conv, self.dim_untouched = dim // 4, dim - dim // 4
        self.conv = nn.Conv2d(self.dim_conv, self.dim_conv, 3, padding=1, bias=False)

    def forward(self, x):
        part, rest = torch.split(x, [self.dim_conv, self.dim_untouched], dim=1)
        return torch.cat((self.conv(part), rest), 1)


class PartialNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.spatial = PartialConv(32)
        self.mlp = nn.Sequential(nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                 nn.Conv2d(64, 32, 1, bias=False))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.mlp(self.spatial(x))
        return self.fc(x.mean((2, 3)))


class ShuffleNet(nn.Module):
    """ShuffleNetV2-style units: chunk in two, one half through a branch, concat, channel shuffle."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.branches = nn.ModuleList(nn.Sequential(
            nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16),
            nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()) for _ in range(2))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for branch in self.branches:
            a, b = x.chunk(2, dim=1)
            x = torch.cat((a, branch(b)), 1)
            n, c, h, w = x.shape
            x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.fc(x.mean((2, 3)))


class ShuffleV1Net(nn.Module):
    """ShuffleNetV1's unit without its residual: grouped 1x1 (groups 4), channel shuffle (view to
    5-D, transpose, view back), depthwise 3x3, grouped 1x1 (groups 4)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.gconv1 = nn.Conv2d(32, 32, 1, groups=4)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.gconv2 = nn.Sequential(nn.Conv2d(32, 32, 1, groups=4, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        y = F.relu(self.gconv1(self.stem(x)))
        n, c, h, w = y.shape
        y = y.view(n, 4, c // 4, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.fc(self.gconv2(self.dw(y)).mean((2, 3)))


class GatedNet(nn.Module):
    """A 1-channel spatial gate multiplied into the features, then squeeze-excitation."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.conv = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.gate = nn.Conv2d(32, 1, 7, padding=3)
        self.mid = nn.Sequential(nn.Conv2d(32, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(64, 16, 1), nn.ReLU(), nn.Conv2d(16, 64, 1),
                                nn.Sigmoid())
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        y = self.conv(self.stem(x))
        y = self.mid(y * torch.sigmoid(self.gate(y)))
        return self.fc((y * self.se(y)).mean((2, 3)))


class ChunkGateNet(nn.Module):
    """A GLU-style gate: one conv's output chunked in two, one half times the sigmoid of the other."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.expand = nn.Conv2d(32, 64, 1)
        self.proj = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        a, b = self.expand(x).chunk(2, dim=1)
        y = a * torch.sigmoid(b)
        return self.fc(self.proj(y).mean((2, 3)))


# -- torchvision's ShuffleNetV2 (torchvision/models/shufflenetv2.py, BSD-3-Clause), copied as it is:
# only the stem's 3 input channels became a parameter (digits have one) and the API-usage log is gone.
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups

    # reshape
    x = x.view(batchsize, groups, channels_per_group, height, width)

    x = torch.transpose(x, 1, 2).contiguous()

    # flatten
    x = x.view(batchsize, num_channels, height, width)

    return x


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()

        if not (1 <= stride <= 3):
            raise ValueError("illegal stride value")
        self.stride = stride

        branch_features = oup // 2
        if (self.stride == 1) and (inp != branch_features << 1):
            raise ValueError(
                f"Invalid combination of stride {stride}, inp {inp} and oup {oup} values. If stride == 1 then "
                f"inp should be equal to oup // 2 << 1."
            )

        if self.stride > 1:
            self.branch1 = nn.Sequential(
                self.depthwise_conv(inp, inp, kernel_size=3, stride=self.stride, padding=1),
                nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch_features, kernel_size=1, stride=1, padding=0, bias=False),
                nn.BatchNorm2d(branch_features),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()

        self.branch2 = nn.Sequential(
            nn.Conv2d(
                inp if (self.stride > 1) else branch_features,
                branch_features,
                kernel_size=1,
                stride=1,
                padding=0,
                bias=False,
            ),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
            self.depthwise_conv(branch_features, branch_features, kernel_size=3, stride=self.stride, padding=1),
            nn.BatchNorm2d(branch_features),
            nn.Conv2d(branch_features, branch_features, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
        )

    @staticmethod
    def depthwise_conv(
        i: int, o: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = False
    ) -> nn.Conv2d:
        return nn.Conv2d(i, o, kernel_size, stride, padding, bias=bias, groups=i)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)

        out = channel_shuffle(out, 2)

        return out


class ShuffleNetV2(nn.Module):
    def __init__(
        self,
        stages_repeats: list[int],
        stages_out_channels: list[int],
        num_classes: int = 1000,
        inverted_residual=InvertedResidual,
        input_channels: int = 3,
    ) -> None:
        super().__init__()

        if len(stages_repeats) != 3:
            raise ValueError("expected stages_repeats as list of 3 positive ints")
        if len(stages_out_channels) != 5:
            raise ValueError("expected stages_out_channels as list of 5 positive ints")
        self._stage_out_channels = stages_out_channels

        output_channels = self._stage_out_channels[0]
        self.conv1 = nn.Sequential(
            nn.Conv2d(input_channels, output_channels, 3, 2, 1, bias=False),
            nn.BatchNorm2d(output_channels),
            nn.ReLU(inplace=True),
        )
        input_channels = output_channels

        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        # Static annotations for mypy
        self.stage2: nn.Sequential
        self.stage3: nn.Sequential
        self.stage4: nn.Sequential
        stage_names = [f"stage{i}" for i in [2, 3, 4]]
        for name, repeats, output_channels in zip(stage_names, stages_repeats, self._stage_out_channels[1:],
                                                  strict=False):
            seq = [inverted_residual(input_channels, output_channels, 2)]
            for _ in range(repeats - 1):
                seq.append(inverted_residual(output_channels, output_channels, 1))
            setattr(self, name, nn.Sequential(*seq))
            input_channels = output_channels

        output_channels = self._stage_out_channels[-1]
        self.conv5 = nn.Sequential(
            nn.Conv2d(input_channels, output_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(output_channels),
            nn.ReLU(inplace=True),
        )

        self.fc = nn.Linear(output_channels, num_classes)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        # See note [TorchScript super()]
        x = self.conv1(x)
        x = self.maxpool(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        x = self.conv5(x)
        x = x.mean([2, 3])  # globalpool
        x = self.fc(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_impl(x)


class FusedAttention(nn.Module):
    """One fused qkv Linear, heads by reshape and indexing."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1))


class FusedViT(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, 32, 4, 4)
        self.norm1, self.attn = nn.LayerNorm(32), FusedAttention(32, 4)
        self.norm2, self.mlp = nn.LayerNorm(32), nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


class AuxNet(nn.Module):
    """Training mode returns (logits, aux_logits); eval mode the logits."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.aux = nn.Linear(32, num_classes)
        self.block2 = nn.Sequential(nn.Conv2d(32, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        mid = self.block1(x)
        logits = self.fc(self.block2(mid).mean((2, 3)))
        return (logits, self.aux(mid.mean((2, 3)))) if self.training else logits


class OnlySplit(nn.Module):
    """Nothing prunable but one group, and that one feeds a split with stored sizes."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.sizes = [4, 12]
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        a, b = torch.split(self.conv(x), self.sizes, dim=1)
        return self.fc(torch.cat((a * 2, b), 1).mean((2, 3)))


class PooledBranches(nn.Module):
    """Two conv branches, globally pooled (average, max), flattened and concatenated into fc."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.local = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.wide = nn.Sequential(nn.Conv2d(16, 32, 5, 2, 2, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x):
        x = self.stem(x)
        a = F.adaptive_avg_pool2d(self.local(x), 1).flatten(1)
        b = F.adaptive_max_pool2d(self.wide(x), 1).flatten(1)
        return self.fc(torch.cat([a, b], dim=1))


class ChannelsLastNet(nn.Module):
    """Conv features viewed channels-last (B, H, W, C), subsampled by a spatial slice (LeViT's
    ``view(b, h, w, c)[:, ::2, ::2]``), then read per position (tokens) and flattened."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.mix = nn.Linear(32, 32)
        self.head = nn.Linear(32, num_classes)
        self.fc = nn.Linear(4 * 4 * 32, num_classes)

    def forward(self, x):
        y = self.conv(self.stem(x)).permute(0, 2, 3, 1)[:, ::2, ::2]  # (B, 4, 4, C), channels last
        b, h, w, c = y.shape
        tokens = F.relu(self.mix(y.reshape(b, h * w, c)))
        return self.fc(y.reshape(b, -1)) + self.head(tokens.mean(1))


def grouped(num_classes=10, norm="bn"):
    return GroupedNet(num_classes, norm)


def tcn(num_classes=10, style="hook"):
    return TCN(num_classes, style)


# -- helpers ------------------------------------------------------------------------------------
def _ready(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Real BatchNorm statistics from real inputs (default ones give degenerate outputs)."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(x)
    return model.eval()


def _prune(model: nn.Module, x: torch.Tensor, **config):
    """Prune 50% with round_to 8; the pruned model runs at batch 1 and 5 with (N, 10) logits."""
    before = layer_widths(model)
    plan = prune_at_ratio(model, PruneEnv(PruneConfig(**{"ratio": 0.5, "round_to": 8, **config}), x, model), 0.5)
    with torch.no_grad():
        assert model.eval()(x[:1]).shape == (1, 10) and model(x[:5]).shape == (5, 10)
        assert torch.isfinite(model(x[:5])).all()
    rows = {r["layer"]: r for r in kept_whole_rows(before, layer_widths(model), plan, 0.5)}
    return plan, before, layer_widths(model), rows


@pytest.fixture(scope="module")
def images(digits16):
    return digits16.val_tensors(64)[0]


@pytest.fixture(scope="module")
def signals():
    from edgekd.data import mnist1d_bundle

    return mnist1d_bundle(num_samples=300).val_tensors(32)[0]


# -- 1. grouped convolutions ----------------------------------------------------------------
@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_grouped_conv_loses_whole_groups_in_multiples_of_lcm(norm, images):
    model = _ready(GroupedNet(norm=norm), images)
    _, before, after, rows = _prune(model, images)
    # 32 channels in 4 groups of 8 -> 16 channels, 4 per group (round_to 8 = lcm(4, 8))
    assert model.grouped.out_channels == 16 and model.grouped.groups == 4
    assert tuple(model.grouped.weight.shape) == (16, 4, 3, 3)
    for name in ("stem.0", "reduce", "grouped", "expand"):
        assert after[name]["width"] == 16, (name, after[name])
    if norm == "gn":
        assert model.n2.num_groups == 4 and model.n2.num_channels == 16
    assert set(rows) == {"fc"} and "classifier" in rows["fc"]["reason"]


# -- 2. weight normalisation ----------------------------------------------------------------
@pytest.mark.parametrize("style", ["hook", "param"])
def test_weight_norm_is_folded_exactly_then_pruned_as_plain_conv1d(style, signals):
    torch.manual_seed(0)
    model = TCN(style=style).eval()
    with torch.no_grad():
        reference = model(signals)
    folded = copy.deepcopy(model)
    assert fold_weight_norm(folded) == ["c1", "c2"]
    assert not any("weight_g" in n or "parametrizations" in n for n, _ in folded.named_parameters())
    with torch.no_grad():
        assert torch.equal(folded(signals), reference)  # the same computation, once
    _, _, after, _ = _prune(model, signals)
    assert type(model.c1) is nn.Conv1d and model.c1.out_channels == 16 and after["c2"]["width"] == 16


def test_folded_model_round_trips_through_the_portable_checkpoint(signals, tmp_path):
    spec = ModelSpec(factory=f"{HERE}:tcn", kwargs={"style": "param"})
    model = spec.build(10, (1, 40))
    fold_weight_norm(model)
    prune_at_ratio(model, PruneEnv(PruneConfig(ratio=0.5), signals, model), 0.5)
    save_portable(model, tmp_path / "m.pt", spec=spec, num_classes=10, input_shape=(1, 40))
    loaded, _ = load_portable(tmp_path / "m.pt", factories=[spec.factory])
    with torch.no_grad():
        assert torch.equal(loaded(signals), model.eval()(signals))
    assert loaded.c1.out_channels == 16


# -- 3. split sizes, channel shuffle, gates -------------------------------------------------------
def test_split_with_stored_sizes_keeps_its_group_and_prunes_the_rest(images):
    """torch.split(x, [8, 24]) with sizes kept on the module: the split tensor keeps its 32 channels
    by design (the reason names the split, its block and the sizes), everything else is pruned.
    torch-pruning gave the sections' offsets to the split's consumers in graph-walk order (rest's
    24 channels to the 8-channel conv: IndexError while scoring, reported as a failed group)."""
    model = _ready(PartialNet(), images)
    plan, before, after, rows = _prune(model, images)
    assert after["mlp.0"]["width"] == 32  # 64 -> 32: the rest is pruned
    assert after["stem.0"]["width"] == 32 and model.spatial.conv.out_channels == 8  # the split's group stays
    reason = rows["stem.0"]["reason"]
    assert reason.startswith("kept at full width by design: torch.split in spatial (PartialConv.forward)"), reason
    assert "[8, 24]" in reason and "failed" not in reason
    assert rows["mlp.3"]["reason"] == reason and all(f.by_design for f in plan.failures)


def test_channel_shuffle_prunes_the_branches_and_keeps_the_shuffled_stream(images):
    model = _ready(ShuffleNet(), images)
    plan, before, after, rows = _prune(model, images)
    assert after["branches.0.0"]["width"] == 8 and after["branches.1.0"]["width"] == 8
    assert after["branches.0.3"]["width"] == 8  # the depthwise conv follows its branch
    assert "stem.0" in rows and "reshape/view" in rows["stem.0"]["reason"]
    # a shuffled stream keeping its width is a choice with its reason, not a group that failed
    assert rows["stem.0"]["reason"].startswith("kept at full width by design: a channel shuffle")
    assert all(f.by_design for f in plan.failures) and not any("failed" in r["reason"] for r in rows.values())




def test_channel_shuffle_between_grouped_convs_loses_whole_units(images):
    """gconv1 (groups 4) -> shuffle -> depthwise -> gconv2 (groups 4): channel c = 8a + b of gconv1
    lands at 4b + a, and gconv2's groups read 8 consecutive shuffled channels, so a unit that stays
    whole groups on both sides is every channel with the same b % 2 (16 channels). Pruning 50%
    removes one unit: gconv1 32 -> 16 and gconv2 reads 16, both still 4 groups, and the pruned
    model computes exactly what the original computes with that unit zeroed (torch-pruning could
    not map channels through the 5-D view: the layers were kept whole)."""
    model = _ready(ShuffleV1Net(), images)
    teacher = copy.deepcopy(model)
    _, before, after, rows = _prune(model, images, ignored_layers=["stem.0", "gconv2.0"])
    assert after["gconv1"]["width"] == 16 and after["dw"]["width"] == 16 and model.gconv2[0].in_channels == 16
    assert model.gconv1.groups == 4 and model.gconv2[0].groups == 4 and model.dw.groups == 16
    kept = _rows_kept(model.gconv1.weight.detach().flatten(1), teacher.gconv1.weight.detach().flatten(1))
    assert sorted(kept) == kept and len({c % 2 for c in kept}) == 1 and len(kept) == 16  # one whole unit
    removed = [c for c in range(32) if c not in kept]
    with torch.no_grad():
        teacher.gconv1.weight[removed] = 0
        teacher.gconv1.bias[removed] = 0
        assert torch.allclose(model(images), teacher(images), atol=1e-5)
    assert "gconv1" not in rows and "dw" not in rows


def _rows_kept(pruned: torch.Tensor, original: torch.Tensor) -> list[int]:
    """Which rows of ``original`` the rows of ``pruned`` are (pruning copies weights, never changes them)."""
    return [int(torch.cdist(row[None], original).argmin()) for row in pruned]


def test_one_channel_spatial_gate_leaves_the_features_channels_free(images):
    """y * sigmoid(gate(y)) with a 1-channel gate: the gate broadcasts over y's channels and ties
    none of them, so conv is cut 32 -> 16 like any layer; the gate keeps its one output channel
    and reads the 16 kept channels (torch-pruning coupled conv's 32 channels to the gate's one)."""
    model = _ready(GatedNet(), images)
    conv, gate = model.conv[0].weight.detach().flatten(1), model.gate.weight.detach().clone()
    stem = model.stem[0].weight.detach().flatten(1)
    _, before, after, rows = _prune(model, images)
    assert after["stem.0"]["width"] == 16 and after["mid.0"]["width"] == 32 and after["se.3"]["width"] == 32
    assert after["conv.0"]["width"] == 16 and "conv.0" not in rows
    assert model.gate.out_channels == 1 and model.gate.in_channels == 16
    stem_kept = _rows_kept(model.stem[0].weight.detach().flatten(1), stem)
    conv_kept = _rows_kept(model.conv[0].weight.detach().flatten(1), conv.view(32, 32, 9)[:, stem_kept].flatten(1))
    assert torch.equal(model.gate.weight.detach(), gate[:, conv_kept])  # the gate reads the kept channels
    assert after["se.1"]["width"] == 8  # squeeze 16 -> 8

def test_chunk_gate_loses_the_same_positions_in_both_halves(images):
    """expand's 64 outputs are two halves multiplied together (a * sigmoid(b)): torch-pruning's
    out_channel_groups={expand: 2} cuts the same positions from both, 16 + 16 (round_to 8 per half)."""
    model = _ready(ChunkGateNet(), images)
    stem, expand = model.stem[0].weight.detach().flatten(1), model.expand.weight.detach().flatten(1)
    _, before, after, rows = _prune(model, images)
    assert after["expand"]["width"] == 32 and model.proj[0].in_channels == 16 and after["stem.0"]["width"] == 16
    stem_kept = _rows_kept(model.stem[0].weight.detach().flatten(1), stem)
    kept = _rows_kept(model.expand.weight.detach().flatten(1), expand[:, stem_kept])
    first, second = [k for k in kept if k < 32], [k - 32 for k in kept if k >= 32]
    assert first == second and len(first) == 16  # a's channel j is kept with b's channel j, in order
    assert "expand" not in rows  # cut as asked: no kept-whole line


def test_pooled_branches_concatenated_into_fc_cut_the_matching_fc_columns(images):
    """Each branch's pooled, flattened channels sit at their concatenation offset in fc's input:
    pruning local 16 -> 8 and wide 32 -> 16 keeps exactly fc's columns of the kept channels
    (torch-pruning read the flatten before the concatenation as a stride of 48 // 16 = 3)."""
    model = _ready(PooledBranches(), images)
    local, wide, fc = (model.local[0].weight.detach().flatten(1), model.wide[0].weight.detach().flatten(1),
                       model.fc.weight.detach().clone())
    stem = model.stem[0].weight.detach().flatten(1)
    _, before, after, rows = _prune(model, images)
    assert after["local.0"]["width"] == 8 and after["wide.0"]["width"] == 16 and model.fc.in_features == 24
    stem_kept = _rows_kept(model.stem[0].weight.detach().flatten(1), stem)
    local_kept = _rows_kept(model.local[0].weight.detach().flatten(1), local.view(16, 16, 9)[:, stem_kept].flatten(1))
    wide_kept = _rows_kept(model.wide[0].weight.detach().flatten(1), wide.view(32, 16, 25)[:, stem_kept].flatten(1))
    expected = torch.cat([fc[:, local_kept], fc[:, [16 + c for c in wide_kept]]], 1)
    assert torch.equal(model.fc.weight.detach(), expected)
    assert set(rows) == {"fc"}


@pytest.mark.parametrize("steps", [1, 3])
def test_channels_last_slice_and_flatten_map_channels_one_to_one_and_per_position(images, steps):
    """A spatial slice of a channels-last tensor keeps every channel, and its flatten puts channel c
    of position p at p * C + c: pruning conv 32 -> 16 keeps mix's columns of the kept channels and
    fc's columns p * 32 + c (torch-pruning read axis 1 as channels: the slice halved the indices);
    in iterative steps too, where the channel count read by the flatten's mapping has changed."""
    model = _ready(ChannelsLastNet(), images)
    conv, mix, fc = (model.conv.weight.detach().flatten(1), model.mix.weight.detach().clone(),
                     model.fc.weight.detach().clone())
    stem = model.stem[0].weight.detach().flatten(1)
    _, before, after, rows = _prune(model, images, steps=steps)
    assert after["conv"]["width"] == 16 and model.mix.in_features == 16 and model.fc.in_features == 16 * 16
    stem_kept = _rows_kept(model.stem[0].weight.detach().flatten(1), stem)
    kept = _rows_kept(model.conv.weight.detach().flatten(1), conv.view(32, 16, 9)[:, stem_kept].flatten(1))
    mix_kept = _rows_kept(model.mix.weight.detach(), mix[:, kept])
    assert torch.equal(model.mix.weight.detach(), mix[mix_kept][:, kept])
    assert torch.equal(model.fc.weight.detach(), fc[:, [p * 32 + c for p in range(16) for c in kept]])
    assert "conv" not in rows and "mix" not in rows


def test_torchvision_shufflenet_v2_prunes_its_branches_and_keeps_the_shuffled_streams(images):
    """torchvision's ShuffleNetV2 made torch-pruning divide by zero (three blocks in a stage): the
    5-D view of each channel shuffle is not index-mapped, the groups through it are kept whole with
    the shuffle named, and every branch's inner 1x1 and depthwise conv lose half their channels."""
    torch.manual_seed(0)
    model = _ready(ShuffleNetV2([3, 1, 1], [16, 32, 64, 128, 128], num_classes=10, input_channels=1), images)
    plan, before, after, rows = _prune(model, images)
    for block in ("stage2.0", "stage2.1", "stage2.2", "stage3.0", "stage4.0"):
        inner = int(before[f"{block}.branch2.0"]["width"])
        assert after[f"{block}.branch2.0"]["width"] == after[f"{block}.branch2.3"]["width"] == inner // 2, block
        assert after[f"{block}.branch2.5"]["width"] == inner  # feeds the concatenation and the shuffle
        reason = rows[f"{block}.branch2.5"]["reason"]
        assert "channel shuffle" in reason and "reshape/view" in reason
        assert reason.startswith("kept at full width by design") and "failed" not in reason, reason
    assert all(row["reason"] for row in rows.values())
    assert {f.operation for f in plan.failures} == {"index mapping"} and all(f.by_design for f in plan.failures)
    assert after["conv5.0"]["width"] == 64  # the last conv is pruned as usual


def test_kept_whole_reasons_name_the_block_whose_forward_runs_the_op(images):
    """The op is named by the module whose forward runs it (recorded while torch-pruning traces),
    not guessed from the nearest layers: torchvision's chunk, cat and shuffle run in the block
    (stage2.1), not in its branch2; a shuffle in the model's own forward names that forward."""
    torch.manual_seed(0)
    model = _ready(ShuffleNetV2([3, 1, 1], [16, 32, 64, 128, 128], num_classes=10, input_channels=1), images)
    _, _, _, rows = _prune(model, images)
    reason = rows["stage2.1.branch2.5"]["reason"]
    assert "torch.cat in stage2.1 (InvertedResidual.forward)" in reason, reason
    assert "torch.split/chunk in stage2.1 (InvertedResidual.forward)" in reason, reason
    assert "branch2 (" not in reason and "in stage2.1.branch2" not in reason
    _, _, _, rows = _prune(_ready(ShuffleNet(), images), images)
    assert "reshape/view in ShuffleNet.forward" in rows["stem.0"]["reason"], rows["stem.0"]["reason"]
    _, _, _, rows = _prune(_ready(PartialNet(), images), images)
    assert "torch.split in spatial (PartialConv.forward)" in rows["stem.0"]["reason"]


def test_nothing_prunable_names_the_layer_the_operation_and_an_ignored_layers_entry(digits16):
    model = _ready(OnlySplit(), digits16.val_tensors(16)[0])
    x = digits16.val_tensors(16)[0]
    with pytest.raises(ModelError, match=r"'conv'.*torch\.split") as info:
        prune_at_ratio(model, PruneEnv(PruneConfig(ratio=0.5), x, model), 0.5)
    assert "ignored_layers: [conv]" in info.value.hint
    ctx = ValidationContext(recipe=None, teacher=model, student=model, example_batch=x[:2], num_classes=10)
    with pytest.raises(RecipeError, match="conv") as info:
        stage_for(PruneConfig(ratio=0.5)).check(ctx)
    assert info.value.exit_code == 2 and "torch-pruning could not prune the student" not in str(info.value)


# -- 4. attention heads -------------------------------------------------------------------------
def test_hugging_face_vit_loses_whole_heads_and_its_attributes_follow(images):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    num_labels=10)
    net = transformers.ViTForImageClassification(config)
    from edgekd.models.adapter import adapt

    model = adapt(net, images[:2]).eval()
    _prune(model, images)
    for layer in net.vit.encoder.layer:
        attn = layer.attention.attention
        assert attn.num_attention_heads == 2 and attn.attention_head_size == 8 and attn.all_head_size == 16
        assert attn.query.out_features == attn.key.out_features == attn.value.out_features == 16


def test_fused_qkv_attention_loses_whole_heads(images):
    model = _ready(FusedViT(), images)
    _, _, after, rows = _prune(model, images)
    assert model.attn.num_heads == 2 and model.attn.head_dim == 8 and model.attn.qkv.out_features == 48
    assert model.attn.proj.in_features == 16 and after["mlp.0"]["width"] == 32


# -- 8. train-mode outputs ----------------------------------------------------------------------
def test_train_only_aux_head_is_pruned_with_the_features(images):
    from edgekd.models.adapter import adapt
    from edgekd.models.batchnorm import recalibrate_batchnorm

    model = _ready(adapt(AuxNet(), images[:2]), images)
    plan, _, after, _ = _prune(model, images)
    net = getattr(model, "model", model)
    assert plan.train_path and net.block1[0].out_channels == 16 and net.aux.in_features == 16
    with torch.no_grad():
        logits, aux = net.train()(images[:4])
    assert logits.shape == aux.shape == (4, 10)
    assert recalibrate_batchnorm(model, [(images[:32], None)], 2) == 1


def test_iterative_steps_list_each_group_kept_whole_once(images):
    """Every step scores a refused group again; groups_kept_whole still lists it once."""
    torch.manual_seed(0)
    model = _ready(ShuffleNetV2([3, 1, 1], [16, 32, 64, 128, 128], num_classes=10, input_channels=1), images)
    plan, _, after, _ = _prune(model, images, steps=3)
    roots = [f.root for f in plan.failures]
    assert roots and len(roots) == len(set(roots))
    assert after["stage2.0.branch2.0"]["width"] == 8  # 16 -> 8 over three steps


class _NarrowGates(nn.Module):
    """A squeeze-excitation whose reduce layer is narrower than round_to (24 -> 4 -> 24) and an ECA gate (a Conv1d
    with one channel sliding over the pooled channel vector): both stay whole, and both used to be missing from
    the report's kept-whole rows (the first looked 'cut as asked within one rounding step')."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.reduce = nn.Conv2d(24, 4, 1)
        self.expand = nn.Conv2d(4, 24, 1)
        self.eca = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        y = self.stem(x)
        y = y * torch.sigmoid(self.expand(F.relu(self.reduce(y.mean((2, 3), keepdim=True)))))
        pooled = y.mean((2, 3))
        y = y * torch.sigmoid(self.eca(pooled.unsqueeze(1))).transpose(1, 2).unsqueeze(-1)
        return self.fc(y.mean((2, 3)))


def test_layers_narrower_than_round_to_and_single_channel_gates_get_a_kept_whole_row(images):
    model = _ready(_NarrowGates(), images)
    _, before, after, rows = _prune(model, images)
    assert after["reduce"]["width"] == 4 and after["eca"]["width"] == 1
    assert rows["reduce"]["reason"] == "round_to 8: 4 channels is less than one multiple"
    assert rows["eca"]["reason"] == "a single output channel: nothing to cut" or "single" in rows["eca"]["reason"]
    # no layer at full width lacks a row
    whole = [name for name, info in before.items() if not name.endswith("#heads") and name in after
             and after[name]["width"] == info["width"]]
    assert set(whole) <= set(rows), set(whole) - set(rows)
