"""Whole attention heads pruned in transformers users bring (issue 13, item 1): timm's fused-qkv
``Attention`` (heads by reshape, q/k/v by indexing, output reshaped to the input width), Hugging
Face Swin (patch merging) and LeViT (heads packed in one BatchNorm'd projection, subsampling attention). Each model is pruned to 50% of
its channels (multiples of 8) as the prune stage does it; the test asserts heads were cut, the
module's head attributes follow, and the pruned model runs at batch 1 and an odd batch in train
and eval mode, and reloads from edgekd's portable checkpoint with the same outputs.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from edgekd.models.adapter import logits_of
from edgekd.models.batchnorm import recalibrate_batchnorm
from edgekd.models.portable import load_portable, save_portable
from edgekd.models.spec import ModelSpec
from edgekd.prune.attention import FusedHeadAttention
from edgekd.prune.config import PruneConfig
from edgekd.prune.heads import swap_fused_attention
from edgekd.prune.pruner import PruningPlan
from edgekd.prune.targets import PruneEnv, prune_at_ratio
from tests.zoo_models import ZOO, TimmAttention

RATIO, ROUND_TO, BATCH = 0.5, 8, 7


@functools.cache
def _data(size: int):
    from edgekd.data import digits_bundle

    return digits_bundle(image_size=size)


def _spec(name: str) -> ModelSpec:
    return ModelSpec(**ZOO[name].recipe_model())


@functools.cache
def _pruned(name: str) -> tuple[nn.Module, nn.Module, PruningPlan]:
    """(teacher, student pruned to 50%, plan); BatchNorm statistics from real digits."""
    zoo = ZOO[name]
    data = _data(zoo.input_shape[-1])
    torch.manual_seed(0)
    teacher = _spec(name).build(data.num_classes, data.input_shape)
    recalibrate_batchnorm(teacher, data.train_loader(64, seed=0), 4)
    student = copy.deepcopy(teacher)
    env = PruneEnv(config=PruneConfig(ratio=RATIO, round_to=ROUND_TO, probe=None),
                   samples=data.train_x[:64].contiguous(), teacher=teacher)
    plan = prune_at_ratio(student, env, RATIO)
    recalibrate_batchnorm(student, data.train_loader(64, seed=1), 4)
    return teacher.eval(), student.eval(), plan


def _assert_runs(model: nn.Module, x: torch.Tensor) -> None:
    """(B, 10) finite logits at batch 1 and 7, eval and train mode (weights restored after); train
    mode at batch 1 only where PyTorch can run it (a BatchNorm that sees one value per channel)."""
    state = copy.deepcopy(model.state_dict())
    try:
        for training in (False, True):
            for batch in (1, BATCH):
                model.train(training)
                try:
                    with torch.no_grad():
                        out = logits_of(model(x[:batch].contiguous()))
                except ValueError as exc:  # PyTorch refuses it (LeViT: a BatchNorm after pooling), pruned or not
                    if training and batch == 1 and "Expected more than 1 value per channel" in str(exc):
                        continue
                    raise
                assert tuple(out.shape) == (batch, 10), f"train={training} batch {batch}: {tuple(out.shape)}"
                assert torch.isfinite(out).all()
    finally:
        model.load_state_dict(state)
        model.eval()


def _assert_reloads(name: str, model: nn.Module, x: torch.Tensor, tmp_path) -> None:
    """The portable checkpoint rebuilds the pruned architecture (swaps, head attributes) exactly."""
    spec = _spec(name)
    path = tmp_path / f"{name}.pt"
    save_portable(model, path, spec=spec, num_classes=10, input_shape=tuple(x.shape[1:]))
    loaded, _ = load_portable(path, factories=[spec.factory])
    with torch.no_grad():
        expected, got = logits_of(model(x[:BATCH])), logits_of(loaded(x[:BATCH]))
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())


# -- timm-style fused-qkv attention -----------------------------------------------------------
def test_timm_vit_loses_whole_heads_and_half_its_width(tmp_path):
    """timm's Attention reshapes the heads' output to the input width: it is swapped for
    FusedHeadAttention (same outputs), which loses 2 of 4 heads (head_dim stays 16), and the
    embedding dim (residual stream) is cut with it, 64 -> 32."""
    teacher, student, plan = _pruned("timm_vit")
    attention = [m for m in student.modules() if isinstance(m, FusedHeadAttention)]
    assert len(attention) == 2 and not any(isinstance(m, TimmAttention) for m in student.modules())
    for module in attention:
        assert (module.num_heads, module.head_dim) == (2, 16)
        assert module.qkv.out_features == 3 * 2 * 16 and module.proj.in_features == 32
    assert student.patch_embed.out_channels == 32 and student.blocks[0].mlp[0].out_features == 64
    assert plan.swapped_attention == ["blocks.0.attn", "blocks.1.attn"]
    assert not plan.failures, [f.reason() for f in plan.failures]
    x = _data(16).val_x
    _assert_runs(student, x)
    _assert_reloads("timm_vit", student, x, tmp_path)


def test_fused_head_attention_matches_timm_attention_before_pruning():
    """The swap keeps the module's function: same outputs, same parameters (shared, not copied)."""
    torch.manual_seed(0)
    original = TimmAttention(32, 4).eval()
    x = torch.randn(3, 5, 32)
    swapped = FusedHeadAttention.from_module(original)
    assert swapped.qkv is original.qkv and swapped.proj is original.proj
    with torch.no_grad():
        assert torch.allclose(swapped(x), original(x), atol=1e-6)


class _ReshapesByHeads(nn.Module):
    """timm-layout attention whose forward already follows its heads (``reshape(B, N, -1)``)."""

    def __init__(self, dim: int = 32, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(torch.softmax(q @ k.transpose(-2, -1), -1).matmul(v).transpose(1, 2).reshape(b, n, -1))


def test_attention_that_can_lose_heads_is_not_swapped():
    """Only modules whose own forward breaks without a head are swapped."""
    model = nn.Sequential(_ReshapesByHeads(), nn.Sequential(TimmAttention(32, 4))).eval()
    assert swap_fused_attention(model, torch.randn(1, 5, 32)) == ["1.0"]
    assert isinstance(model[0], _ReshapesByHeads) and isinstance(model[1][0], FusedHeadAttention)


class _WithTemperature(TimmAttention):
    """timm's layout with a learnt temperature on the attention logits: not timm's function."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__(dim, num_heads)
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale * self.temperature
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c))


def test_attention_with_another_function_is_not_swapped():
    """A module that computes something else than timm's attention keeps its class (its heads are
    then cut in place or kept whole with the cause, never replaced by different arithmetic)."""
    model = nn.Sequential(_WithTemperature(32, 4)).eval()
    assert swap_fused_attention(model, torch.randn(1, 5, 32)) == []
    assert isinstance(model[0], _WithTemperature)


@pytest.mark.parametrize("batch", [1, BATCH])
def test_pruned_timm_vit_heads_after_iterative_steps(batch):
    """Three iterative steps reach the same head count as one (2 of 4), never zero heads."""
    data = _data(16)
    torch.manual_seed(0)
    model = _spec("timm_vit").build(10, data.input_shape)
    config = PruneConfig(ratio=RATIO, round_to=ROUND_TO, probe=None, steps=3)
    prune_at_ratio(model, PruneEnv(config=config, samples=data.train_x[:64].contiguous(), teacher=model), RATIO)
    assert [m.num_heads for m in model.modules() if isinstance(m, FusedHeadAttention)] == [2, 2]
    with torch.no_grad():
        assert model.eval()(data.val_x[:batch]).shape == (batch, 10)


# -- Hugging Face Swin ------------------------------------------------------------------------
def _rows_kept(pruned: torch.Tensor, original: torch.Tensor) -> list[int]:
    """Which rows of ``original`` the rows of ``pruned`` are (pruning copies weights, never changes them)."""
    return [int(torch.cdist(row[None], original).argmin()) for row in pruned]


def test_hf_swin_loses_whole_heads_and_half_its_embedding_width(tmp_path):
    """Swin's heads (2 and 4 per stage) go to 1 and 2 with their columns of the relative position
    bias table; the MLP hidden width halves; the residual stream (channels last through 6-D window
    views, patch merging's stride-2 slices and concatenation on the last axis) halves too, and
    patch merging keeps the LayerNorm/reduction columns k * C + c of each kept channel c."""
    from edgekd.prune.pruner import kept_whole_rows, layer_widths

    teacher, student, plan = _pruned("hf_swin")
    attention = [m for m in student.modules() if type(m).__name__ == "SwinSelfAttention"]
    assert [m.num_attention_heads for m in attention] == [1, 2]
    for module in attention:
        assert module.attention_head_size == 16 and module.all_head_size == 16 * module.num_attention_heads
        assert module.query.out_features == module.key.out_features == module.value.out_features == module.all_head_size
        assert module.relative_position_bias_table.shape[1] == module.num_attention_heads
    blocks = [m for m in student.modules() if type(m).__name__ == "SwinLayer"]
    assert [b.intermediate.dense.out_features for b in blocks] == [64, 128]
    assert [b.attention.output.dense.in_features for b in blocks] == [16, 32]
    assert [b.attention.output.dense.out_features for b in blocks] == [16, 32]
    assert [b.output.dense.out_features for b in blocks] == [16, 32]
    embed = student.model.swin.embeddings.patch_embeddings.projection
    assert embed.out_channels == 16
    kept = _rows_kept(embed.weight.detach().flatten(1),
                      teacher.model.swin.embeddings.patch_embeddings.projection.weight.detach().flatten(1))
    merge, merge_before = student.model.swin.encoder.layers[0].downsample, teacher.model.swin.encoder.layers[0].downsample
    columns = [k * 32 + c for k in range(4) for c in kept]  # the 4 slices concatenated on the channel axis
    assert torch.equal(merge.norm.weight.detach(), merge_before.norm.weight.detach()[columns])
    reduction_kept = _rows_kept(merge.reduction.weight.detach(), merge_before.reduction.weight.detach()[:, columns])
    assert torch.equal(merge.reduction.weight.detach(), merge_before.reduction.weight.detach()[reduction_kept][:, columns])
    assert merge.reduction.out_features == 32
    rows = kept_whole_rows(layer_widths(teacher), layer_widths(student), plan, RATIO)
    assert [r["layer"] for r in rows] == ["model.classifier"] and not plan.failures
    kept_params = sum(p.numel() for p in student.parameters()) / sum(p.numel() for p in teacher.parameters())
    assert kept_params < 0.3
    x = _data(32).val_x
    _assert_runs(student, x)
    _assert_reloads("hf_swin", student, x, tmp_path)


# -- Hugging Face LeViT -----------------------------------------------------------------------
def test_hf_levit_loses_whole_packed_heads_and_its_embedding_width(tmp_path):
    """LeViT packs each head's q, k and v together in one Linear + BatchNorm and has one row of
    attention biases per head: heads go 2 -> 1 (attention) and 4 -> 2 (subsampling attention) with
    their rows, BatchNorm channels, output-projection columns and bias rows; the widths its forward
    reshapes by follow. The single-head stage keeps its head by design. The embedding dims
    (channels-last through LevitSubsample's view and stride-2 slice) and MLPs are halved."""
    from edgekd.prune.pruner import kept_whole_rows, layer_widths

    teacher, student, plan = _pruned("hf_levit")
    levit = student.model.levit
    attention = [m for m in student.modules() if type(m).__name__ == "LevitAttention"]
    subsample = [m for m in student.modules() if type(m).__name__ == "LevitAttentionSubsample"]
    before = [m.num_attention_heads for m in teacher.modules() if type(m).__name__ == "LevitAttentionSubsample"]
    assert before == [4, 6]  # LevitConfig sets them: hidden_sizes[i] // key_dim[0]
    assert [m.num_attention_heads for m in attention] == [1, 1, 1]
    assert [m.num_attention_heads for m in subsample] == [2, 3]
    for module in attention:
        qkv = module.queries_keys_values
        assert qkv.linear.out_features == qkv.batch_norm.num_features == module.out_dim_keys_values
        assert module.out_dim_keys_values == module.num_attention_heads * (2 + module.attention_ratio) * module.key_dim
        assert module.projection.linear.in_features == module.out_dim_projection
    for module in subsample:
        assert module.keys_values.linear.out_features == module.keys_values.batch_norm.num_features == \
            module.out_dim_keys_values == module.num_attention_heads * (1 + module.attention_ratio) * module.key_dim
        assert module.queries.linear.out_features == module.num_attention_heads * module.key_dim
        assert module.projection.linear.in_features == module.out_dim_projection
    for module in attention + subsample:
        assert module.attention_biases.shape[0] == module.num_attention_heads
    assert levit.patch_embeddings.embedding_layer_4.convolution.out_channels == 16
    assert subsample[0].queries.linear.in_features == subsample[0].keys_values.linear.in_features == 16
    rows = {r["layer"]: r["reason"] for r in kept_whole_rows(layer_widths(teacher), layer_widths(student), plan, RATIO)}
    assert "single head" in rows["model.levit.encoder.stages.0.layers.0.module.queries_keys_values.linear"]
    assert not plan.failures, [f.reason() for f in plan.failures]
    kept = sum(p.numel() for p in student.parameters()) / sum(p.numel() for p in teacher.parameters())
    assert kept < 0.35
    x = _data(32).val_x
    _assert_runs(student, x)
    _assert_reloads("hf_levit", student, x, tmp_path)


@pytest.mark.parametrize("name, embedding", [
    ("hf_levit", "model.levit.patch_embeddings.embedding_layer_4.convolution"),
    ("hf_swin", "model.swin.embeddings.patch_embeddings.projection"),
])
def test_channels_last_models_reach_the_same_widths_in_three_iterative_steps(name, embedding):
    """torch-pruning maps indices again after each cut, when the traced sizes no longer match the
    pruned widths: the channels-last rules are decided once at the trace, so three steps cut the
    embedding 32 -> 16 with no group kept whole, as one step does."""
    data = _data(32)
    torch.manual_seed(0)
    model = _spec(name).build(10, data.input_shape)
    config = PruneConfig(ratio=RATIO, round_to=ROUND_TO, probe=None, steps=3)
    plan = prune_at_ratio(model, PruneEnv(config=config, samples=data.train_x[:64].contiguous(), teacher=model),
                          RATIO)
    assert not plan.failures, [f.reason() for f in plan.failures]
    assert model.get_submodule(embedding).out_channels == 16
    _assert_runs(model, data.val_x)


class _HandWrittenAttention(nn.Module):
    """Fused qkv named ``to_qkv`` and an output Linear named ``out``, heads by reshape, no ``scale`` attribute:
    how many hand-written attentions look. With ``out`` unrecognised the prune stage refused the whole model."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.to_qkv(x).reshape(b, n, 3, self.n_heads, c // self.n_heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) / (q.shape[-1] ** 0.5)).softmax(dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, c))


class _TinyTransformer(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, 4, 4)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _HandWrittenAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = tokens + self.attn(self.norm1(tokens))
        tokens = tokens + self.mlp(self.norm2(tokens))
        return self.head(tokens.mean(1))


def test_hand_written_attention_named_to_qkv_and_out_loses_whole_heads():
    data = _data(16)
    torch.manual_seed(0)
    teacher = _TinyTransformer().eval()
    student = copy.deepcopy(teacher)
    env = PruneEnv(config=PruneConfig(ratio=RATIO, round_to=ROUND_TO, probe=None),
                   samples=data.train_x[:64].contiguous(), teacher=teacher)
    plan = prune_at_ratio(student, env, RATIO)
    assert not plan.failures, [f.reason() for f in plan.failures]
    attention = [m for m in student.modules() if isinstance(m, FusedHeadAttention)]
    assert plan.swapped_attention == ["attn"] and len(attention) == 1
    assert attention[0].num_heads == 2 and attention[0].proj.in_features == 2 * attention[0].head_dim
    assert student.embed.out_channels == 32
    _assert_runs(student, data.val_x)
