"""The prune stage on real models and real data: every built-in and user-style models are pruned,
still run, export to ONNX and agree with ONNX Runtime; targets are reached or refused clearly;
a pruned checkpoint reloads with weights_only=True in a fresh process with identical outputs."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

import edgekd.prune.stage  # noqa: F401  (registers the stage)
from edgekd.errors import ModelError, RecipeError, TargetUnreachableError
from edgekd.models.batchnorm import recalibrate_batchnorm
from edgekd.models.portable import save_portable
from edgekd.models.spec import ModelSpec
from edgekd.models.stats import count_params_macs
from edgekd.pipeline.rundir import RunDir
from edgekd.prune.attention import SplitHeadAttention
from edgekd.prune.config import PruneConfig
from edgekd.prune.latency import export_for_timing
from edgekd.prune.pruner import find_classifier, layer_widths
from edgekd.prune.targets import PruneEnv, prune_at_ratio, reach_target
from edgekd.report.markdown import render_markdown
from edgekd.report.schema import Report
from edgekd.report.tables import fmt_count
from edgekd.runtimes.registry import get_runtime
from edgekd.stage.base import stage_for
from edgekd.stage.context import RunContext, ValidationContext

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def signals():
    from edgekd.data import mnist1d_bundle

    return mnist1d_bundle(num_samples=600)


def _spec(name: str) -> ModelSpec:
    if name.startswith("tests."):
        return ModelSpec(factory=name)
    return ModelSpec(model=name, kwargs={"width_mult": 0.5} if name == "mobilenetv2" else {})


def _ready(spec: ModelSpec, data, seed: int = 0) -> nn.Module:
    """A built model with real BatchNorm statistics (default ones give degenerate outputs)."""
    torch.manual_seed(seed)
    model = spec.build(data.num_classes, data.input_shape)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(data.calibration_batch(128, seed))
    return model.eval()


def _onnx_outputs(model: nn.Module, x: torch.Tensor, path: Path) -> np.ndarray:
    export_for_timing(model, x, path)
    return get_runtime("onnxruntime").load(path, threads=1).run(x.numpy())


MODELS = [
    ("resnet20", "digits"), ("mobilenetv2", "digits"), ("cnn1d", "signals"), ("mlp", "signals"),
    ("vit_tiny", "digits"), ("tests.factories:dict_net", "digits"), ("tests.factories:hf_net", "digits"),
]


@pytest.mark.parametrize(("name", "source"), MODELS)
def test_every_model_is_pruned_runs_and_exports(name, source, digits16, signals, tmp_path):
    data = digits16 if source == "digits" else signals
    model = _ready(_spec(name), data)
    x = data.val_tensors(16)[0]
    classifier = find_classifier(model, x)
    before_params, before_macs = count_params_macs(model, x)
    before = layer_widths(model)

    prune_at_ratio(model, PruneEnv(PruneConfig(ratio=0.5), x, model), 0.5)

    after = layer_widths(model.eval())
    params, macs = count_params_macs(model, x)
    assert params < 0.6 * before_params and macs < 0.6 * before_macs
    assert after[classifier]["width"] == before[classifier]["width"] == data.num_classes
    shrunk = [n for n in before if n in after and after[n]["width"] < before[n]["width"]]
    assert shrunk, "no layer lost channels"
    with torch.no_grad():
        out = model(x)
    assert out.shape == (16, data.num_classes) and torch.isfinite(out).all()
    ort_out = _onnx_outputs(model, x, tmp_path / "pruned.onnx")
    np.testing.assert_allclose(ort_out, out.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "source"), MODELS)
def test_every_pruned_model_exports_with_the_shipping_exporter(name, source, digits16, signals, tmp_path):
    """The torch.export-based path the export stage ships (slow: about 10-20 s a model here)."""
    from edgekd.export.onnx_export import export_onnx

    data = digits16 if source == "digits" else signals
    model = _ready(_spec(name), data)
    x = data.val_tensors(16)[0]
    prune_at_ratio(model, PruneEnv(PruneConfig(ratio=0.5), x, model), 0.5)
    info = export_onnx(model, x, tmp_path / "m.onnx")
    assert info["exporter"] == "torch.export", info.get("fallback_reason")
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    got = get_runtime("onnxruntime").load(tmp_path / "m.onnx", threads=1).run(x.numpy())
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_vit_loses_whole_heads_and_the_swap_is_exact(digits16):
    model = _ready(_spec("vit_tiny"), digits16)
    x = digits16.val_tensors(8)[0]
    with torch.no_grad():
        reference = model(x)
    config = PruneConfig(ratio=0.5)
    unpruned = copy.deepcopy(model)
    prune_at_ratio(unpruned, PruneEnv(config, x, unpruned), 0.0)  # ratio 0: only the attention swap
    with torch.no_grad():
        torch.testing.assert_close(unpruned(x), reference, atol=1e-5, rtol=1e-5)
    prune_at_ratio(model, PruneEnv(config, x, model), 0.5)
    attention = [m for m in model.modules() if isinstance(m, SplitHeadAttention)]
    assert len(attention) == 4
    assert all(m.num_heads == 2 and m.head_dim == 16 for m in attention)  # 4 heads of 16 -> 2 heads of 16


def test_iterative_head_pruning_counts_from_the_initial_heads(digits16):
    """torch-pruning alone recounts from the current heads each step: 4 heads at 25/50/75% end at 0."""
    model = _ready(_spec("vit_tiny"), digits16)
    x = digits16.val_tensors(8)[0]
    prune_at_ratio(model, PruneEnv(PruneConfig(ratio=0.75, steps=3, scope="global"), x, model), 0.75)
    assert [m.num_heads for m in model.modules() if isinstance(m, SplitHeadAttention)] == [1, 1, 1, 1]
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale", "lamp", "taylor", "random"])
def test_each_importance_criterion(importance, digits16):
    model = _ready(_spec("resnet20"), digits16)
    x = digits16.val_tensors(8)[0]
    env = PruneEnv(PruneConfig(ratio=0.5, importance=importance, scope="global", taylor_batches=2), x, model,
                   gradient_batches=lambda: digits16.train_loader(32))
    params_before = count_params_macs(model, x)[0]
    prune_at_ratio(model, env, 0.5)
    assert count_params_macs(model, x)[0] < params_before
    assert all(p.grad is None for p in model.parameters())  # Taylor's probe gradients are cleared
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_importance_choice_changes_which_channels_go(digits16):
    x = digits16.val_tensors(8)[0]
    kept = {}
    for importance in ("l2", "random"):
        model = _ready(_spec("resnet20"), digits16)
        first_weight = model.conv1.weight.detach().clone()
        prune_at_ratio(model, PruneEnv(PruneConfig(ratio=0.5, importance=importance), x, model), 0.5)
        # recover which of the stem's output channels survived
        kept[importance] = sorted(int(torch.cdist(w.flatten()[None], first_weight.flatten(1)).argmin())
                                  for w in model.conv1.weight.detach())
    assert len(kept["l2"]) == 8 and kept["l2"] != kept["random"]


@pytest.mark.parametrize(("scope", "round_to"), [("per_layer", 8), ("global", 8), ("per_layer", 4)])
def test_round_to_and_the_layer_cap_are_respected(scope, round_to, digits16):
    model = _ready(_spec("resnet20"), digits16)
    x = digits16.val_tensors(4)[0]
    before = layer_widths(model)
    config = PruneConfig(ratio=0.7, scope=scope, round_to=round_to, max_layer_ratio=0.75)
    prune_at_ratio(model, PruneEnv(config, x, model), 0.7)
    after = layer_widths(model)
    for name, info in after.items():
        if info["width"] == before[name]["width"]:
            continue  # the classifier
        assert info["width"] % round_to == 0, (name, info)
        assert info["width"] >= round_to
        assert info["width"] >= before[name]["width"] * (1 - 0.75) - 1e-9, (name, info)


def test_nearest_rounding_still_prunes_narrow_layers(digits16):
    """torch-pruning's own round_to (down) skips a 16-wide layer at 70%; ours keeps 8 of 16."""
    model = _ready(_spec("resnet20"), digits16)
    x = digits16.val_tensors(4)[0]
    prune_at_ratio(model, PruneEnv(PruneConfig(ratio=0.7, round_to=8), x, model), 0.7)
    assert model.conv1.out_channels == 8 and model.layer3[0].conv1.out_channels == 16  # 64 * 0.3 = 19.2 -> 16


def test_macs_target_is_reached_with_the_least_pruning(digits16):
    teacher = _ready(_spec("resnet20"), digits16)
    x = digits16.val_tensors(8)[0]
    config = PruneConfig(macs_reduction=3.0, refine=3)
    outcome = reach_target(copy.deepcopy(teacher), PruneEnv(config, x, teacher))
    t_macs = count_params_macs(teacher, x)[1]
    reduction = t_macs / count_params_macs(outcome.model, x)[1]
    assert 3.0 <= reduction < 3.3, outcome.trials  # mixing layers between two ratios lands close to 3x
    assert any(not t["met"] for t in outcome.trials)
    assert reduction < max(t["figure"] for t in outcome.trials)  # not simply the most pruned candidate
    assert "macs reduction" in outcome.reached


def test_params_target_counts_parameters(signals):
    teacher = _ready(_spec("cnn1d"), signals)
    x = signals.val_tensors(8)[0]
    outcome = reach_target(copy.deepcopy(teacher), PruneEnv(PruneConfig(params_reduction=2.0), x, teacher))
    assert count_params_macs(teacher, x)[0] / count_params_macs(outcome.model, x)[0] >= 2.0


def test_loose_latency_target_on_a_tiny_model_is_met(signals):
    teacher = _ready(_spec("cnn1d"), signals)
    x = signals.val_tensors(32)[0]
    config = PruneConfig(latency={"ms": 50.0, "threads": 1, "batch_size": 4}, refine=0)
    outcome = reach_target(copy.deepcopy(teacher), PruneEnv(config, x, teacher))
    assert outcome.trials[0]["ratio"] == 0.0 and outcome.trials[0]["met"]  # already fast enough: no pruning
    assert outcome.ratio == 0.0 and "ms" in outcome.reached
    assert outcome.trials[-1]["verify"] and outcome.trials[-1]["met"]  # timed again, longer, before acceptance


def test_unreachable_target_names_the_best_figure(signals):
    teacher = _ready(_spec("mlp"), signals)
    x = signals.val_tensors(8)[0]
    config = PruneConfig(macs_reduction=1000.0)
    with pytest.raises(TargetUnreachableError, match=r"best reached was \d+\.\d+x macs reduction at channel ratio 0\.90"):
        reach_target(copy.deepcopy(teacher), PruneEnv(config, x, teacher))


def test_unreachable_speedup_is_measured_and_refused(signals):
    teacher = _ready(_spec("mlp"), signals)
    x = signals.val_tensors(8)[0]
    config = PruneConfig(speedup={"factor": 500.0, "batch_size": 1}, max_layer_ratio=0.5)
    with pytest.raises(TargetUnreachableError, match=r"measured speed-up at channel ratio"):
        reach_target(copy.deepcopy(teacher), PruneEnv(config, x, teacher))


@pytest.mark.parametrize("bad", [
    {"ratio": 1.0}, {"ratio": -0.1}, {}, {"ratio": 0.5, "macs_reduction": 2.0}, {"macs_reduction": 0.5},
    {"ratio": 0.95}, {"ratio": 0.5, "importance": "l3"}, {"ratio": 0.5, "round_to": 0}, {"ratio": 0.5, "stepz": 2},
    {"latency": {"ms": 0}}, {"speedup": {"factor": 2, "runtime": "tflite"}},
])
def test_bad_config_values_fail_validation(bad):
    with pytest.raises(ValidationError):
        PruneConfig(**bad)


def _validation_ctx(model, data) -> ValidationContext:
    return ValidationContext(recipe=None, teacher=model, student=model, example_batch=data.example_batch(2),
                             num_classes=data.num_classes)


def test_check_names_an_unknown_ignored_layer_with_close_matches(digits16):
    model = _ready(_spec("tests.factories:dict_net"), digits16)  # wrapped: user names are unprefixed
    stage = stage_for(PruneConfig(ratio=0.5, ignored_layers=["conv"]))
    stage.check(_validation_ctx(model, digits16))  # "conv" resolves inside the adapter
    stage = stage_for(PruneConfig(ratio=0.5, ignored_layers=["bnn"]))
    with pytest.raises(RecipeError, match="'bnn' is not a module") as info:
        stage.check(_validation_ctx(model, digits16))
    assert info.value.key == "prune.ignored_layers" and "'bn'" in info.value.hint
    assert info.value.exit_code == 2


def test_check_refuses_unreachable_macs_and_batchnorm_free_bn_scale(signals):
    model = _ready(_spec("mlp"), signals)
    with pytest.raises(RecipeError, match="out of reach") as info:
        stage_for(PruneConfig(macs_reduction=500.0)).check(_validation_ctx(model, signals))
    assert info.value.key == "prune.macs_reduction"
    with pytest.raises(RecipeError, match="no BatchNorm") as info:
        stage_for(PruneConfig(ratio=0.5, importance="bn_scale")).check(_validation_ctx(model, signals))
    assert info.value.key == "prune.importance"


def test_unknown_ignored_layer_at_run_time_is_a_model_error(digits16):
    model = _ready(_spec("resnet20"), digits16)
    x = digits16.val_tensors(2)[0]
    with pytest.raises(ModelError, match="layer4"):
        prune_at_ratio(model, PruneEnv(PruneConfig(ratio=0.5, ignored_layers=["layer4"]), x, model), 0.5)


def test_ignored_layers_keep_their_width(digits16):
    model = _ready(_spec("resnet20"), digits16)
    x = digits16.val_tensors(2)[0]
    config = PruneConfig(ratio=0.5, ignored_layers=["layer1.0.conv1"])
    prune_at_ratio(model, PruneEnv(config, x, model), 0.5)
    assert model.layer1[0].conv1.out_channels == 16 and model.layer1[1].conv1.out_channels == 8


def test_batchnorm_recalibration_averages_the_batches(digits16):
    model = _ready(_spec("resnet20"), digits16)
    x = digits16.val_tensors(2)[0]
    prune_at_ratio(model, PruneEnv(PruneConfig(ratio=0.5), x, model), 0.5)
    batches = [(digits16.train_x[i:i + 32], None) for i in (0, 32)]
    assert recalibrate_batchnorm(model, batches, max_batches=5) == 2
    with torch.no_grad():
        stem = torch.cat([model.conv1(b) for b, _ in batches])
    torch.testing.assert_close(model.bn1.running_mean, stem.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)
    assert model.bn1.momentum == 0.1 and not model.training  # settings restored


RECIPE = """\
name: t
seed: 0
data:
  dataset: digits
  image_size: 16
teacher:
  model: resnet20
  train:
    epochs: 1
stages:
  - prune: {PRUNE}
"""


def _doc(prune: str):
    from edgekd.recipe.load import parse_recipe

    return parse_recipe(RECIPE.replace("{PRUNE}", prune), "recipe.yaml")


@pytest.mark.parametrize(("prune", "key", "words"), [
    ("{ratio: 1.0}", "stages.0.prune.ratio", "less than 1"),
    ("{macs_reduction: 0.5}", "stages.0.prune.macs_reduction", "greater than 1"),
    ("{ratio: 0.5, importanc: l1}", "stages.0.prune", "importanc"),
])
def test_recipe_errors_name_the_line_and_key(prune, key, words):
    with pytest.raises(RecipeError) as info:
        _doc(prune)
    assert info.value.key.startswith(key) and info.value.line == 11 and words in str(info.value)
    assert info.value.exit_code == 2


def test_validate_names_an_unknown_ignored_layer_at_its_line():
    from edgekd.pipeline.validate import validate_document

    with pytest.raises(RecipeError) as info:
        validate_document(_doc("{ratio: 0.5, ignored_layers: [layer1.0.conv3]}"))
    assert info.value.key == "stages.0.prune.ignored_layers" and info.value.line == 11
    assert "layer1.0.conv1" in info.value.hint and info.value.exit_code == 2


def test_stage_run_records_counts_channels_latency_and_a_ledger_row(digits16, tmp_path):
    teacher = _ready(_spec("resnet20"), digits16)
    ctx = RunContext(recipe=_doc("{ratio: 0.5}").recipe, run_dir=RunDir(tmp_path), data=digits16, device=torch.device("cpu"),
                     teacher=teacher, student=copy.deepcopy(teacher))
    config = PruneConfig(ratio=0.5, probe={"threads": 1, "batch_sizes": [1, 8], "min_time_s": 0.05})
    stage_for(config).run(ctx)
    data = ctx.report_data["prune"]
    assert data["after"]["params"] < data["before"]["params"] == data["teacher"]["params"]
    assert data["after"]["macs"] < data["before"]["macs"]
    rows = {r["layer"]: r for r in data["channels"]}
    assert rows["conv1"]["before"] == 16 and rows["conv1"]["after"] == 8 and rows["fc"]["after"] == 10
    assert [r["batch_size"] for r in data["latency"]] == [1, 8]
    for row in data["latency"]:
        assert row["runtime"] == "onnxruntime" and row["threads"] == 1
        assert row["teacher"]["p50_ms"] > 0 and row["student"]["p50_ms"] > 0
    assert ctx.ledger[-1].stage == "prune" and ctx.ledger[-1].params == data["after"]["params"]
    assert (tmp_path / "stages" / "prune" / "prune.json").is_file()
    assert ctx.student is not teacher and ctx.student.conv1.out_channels == 8
    assert data["bn_recalibration_batches"] == 8 and 0 <= data["val_accuracy_after_prune"] <= 100


def test_portable_round_trip_in_a_fresh_process(digits16, signals, tmp_path):
    """Every pruned built-in reloads with weights_only=True, without this process's objects."""
    cases = [("resnet20", digits16), ("mobilenetv2", digits16), ("cnn1d", signals), ("mlp", signals),
             ("vit_tiny", digits16), ("tests.factories:hf_net", digits16)]
    for i, (name, data) in enumerate(cases):
        spec = _spec(name)
        model = _ready(spec, data)
        x = data.val_tensors(8)[0]
        prune_at_ratio(model, PruneEnv(PruneConfig(ratio=0.5), x, model), 0.5)
        with torch.no_grad():
            y = model.eval()(x)
        save_portable(model, tmp_path / f"{i}.pt", spec=spec, num_classes=data.num_classes,
                      input_shape=data.input_shape)
        torch.save({"x": x, "y": y}, tmp_path / f"{i}.io.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from pathlib import Path
        from edgekd.models.portable import load_portable
        torch.set_num_threads(1)  # as in this process: conv reductions then add up in the same order
        for i in range({len(cases)}):
            # the caller names the factories it trusts (a checkpoint never chooses code to run)
            model, meta = load_portable(Path(sys.argv[1]) / f"{{i}}.pt", factories=["tests.factories:hf_net"])
            io = torch.load(Path(sys.argv[1]) / f"{{i}}.io.pt", weights_only=True)
            with torch.no_grad():
                out = model(io["x"])
            assert torch.equal(out, io["y"]), (i, (out - io["y"]).abs().max())
        print("identical", {len(cases)})
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"identical {len(cases)}" in done.stdout


@pytest.fixture(scope="module")
def trained_resnet(digits8):
    """A ResNet-20 (width 16) trained 3 epochs on 8x8 digits (about 95% val): its channels are about
    equally important, so one-shot 60% pruning leaves it near chance, as the quickstart's."""
    from edgekd.train.config import TrainConfig
    from edgekd.train.objectives import CrossEntropyObjective
    from edgekd.train.trainer import fit

    torch.manual_seed(0)
    model = ModelSpec(model="resnet20", kwargs={"width": 16}).build(digits8.num_classes, digits8.input_shape)
    with TemporaryDirectory() as workdir:
        fit(model, CrossEntropyObjective(), digits8, TrainConfig(epochs=3), Path(workdir), device=torch.device("cpu"))
    return model.eval()


def _run_prune_stage(config: PruneConfig, teacher: nn.Module, data, out: Path) -> RunContext:
    ctx = RunContext(recipe=_doc("{ratio: 0.6}").recipe, run_dir=RunDir(out), data=data, device=torch.device("cpu"),
                     teacher=teacher, student=copy.deepcopy(teacher))
    stage_for(config).run(ctx)
    return ctx


def test_iterative_pruning_with_recovery_keeps_the_student_alive(trained_resnet, digits8, tmp_path):
    """steps: 3 prunes 20/40/60% with one recovery epoch (KD from the teacher) between steps and
    BatchNorm recalibration after each; every step's accuracy is in the stage data. One-shot 60%
    leaves this student near chance, three steps well above it."""
    one_shot = _run_prune_stage(PruneConfig(ratio=0.6, probe=None, auto_steps=0), trained_resnet, digits8,
                                tmp_path / "one")
    stepped = _run_prune_stage(PruneConfig(ratio=0.6, steps=3, probe=None), trained_resnet, digits8,
                               tmp_path / "three")
    single, data = one_shot.report_data["prune"], stepped.report_data["prune"]
    assert [r["step"] for r in single["steps"]] == [1] and single["recovery"] is None
    assert single["auto_steps"] is None  # auto_steps: 0 keeps the dead one-shot student (no retry)
    rows = data["steps"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["channel_ratio"] for r in rows] == pytest.approx([0.2, 0.4, 0.6])
    assert rows[0]["params"] > rows[1]["params"] > rows[2]["params"] == data["after"]["params"]
    assert rows[0]["macs"] > rows[1]["macs"] > rows[2]["macs"] == data["after"]["macs"]
    for row in rows[:2]:  # recovery ran between steps and improved the student it started from
        assert row["recovery"]["objective"] == "distill" and row["recovery"]["epochs"] == 1
        assert row["recovery"]["val_accuracy_after"] > row["val_accuracy"]
    assert "recovery" not in rows[2]  # the last step's recovery is the recipe's distill stage
    assert rows[2]["val_accuracy"] == pytest.approx(data["val_accuracy_after_prune"], abs=1e-3)
    # same final widths, far more accuracy: one-shot is near chance (10%), steps are alive
    assert data["after"] == single["after"]
    # near chance: 13-17% val across machines (Intel AVX-512 vs AMD AVX2 numerics), either side of the 1.5x-chance
    # line "alive" draws, so the verdict is checked for consistency rather than for one side
    assert single["val_accuracy_after_prune"] < 30
    assert single["alive"]["alive"] == (single["val_accuracy_after_prune"] > 1.5 * single["alive"]["chance_accuracy"])
    assert data["val_accuracy_after_prune"] > single["val_accuracy_after_prune"] + 25 and data["alive"]["alive"]
    assert all(r["alive"] and r["finite"] for r in rows)
    assert "→" in stepped.ledger[-1].notes["val_by_step"]
    assert (tmp_path / "three" / "stages" / "prune" / "recovery" / "step1" / "best.pt").is_file()
    # the report shows what prune.json holds: per-layer widths, the layer kept whole and why, each step
    md = render_markdown(Report(generated="now", run_dir=str(tmp_path), name="steps", stage_data=stepped.report_data))
    assert "## Pruning: output channels per layer" in md and "## Pruning steps" in md
    assert "| fc | Linear | 10 | 10 | 100% | classifier (its outputs are the classes) |" in md
    assert re.search(r"\| layer3\.0\.conv1 \| Conv2d \| 64 \| \d+ \| \d+% \|  \|", md), md
    assert f"| 1 | 0.20 | {fmt_count(rows[0]['params'])} |" in md and "1 epoch(s) distill" in md


def test_a_one_shot_cut_that_kills_the_student_is_redone_in_steps(trained_resnet, digits8, tmp_path):
    """steps: 1 (the default) with a ratio target: one-shot 60% leaves this student at chance, so the
    stage prunes the unpruned student again in auto_steps (5) steps with recovery between them and
    keeps that student; prune.json says what each gave. (HF MobileViT at 50%: one-shot 7.8% val.)"""
    ctx = _run_prune_stage(PruneConfig(ratio=0.6, probe=None), trained_resnet, digits8, tmp_path / "auto")
    data = ctx.report_data["prune"]
    auto = data["auto_steps"]
    assert auto["steps"] == 5 and auto["kept"] == "stepped" and auto["kept_share"] < 0.5
    assert auto["one_shot_val_accuracy"] < 30  # near chance (10 classes), as the one-shot test above
    assert auto["stepped_val_accuracy"] == pytest.approx(data["val_accuracy_after_prune"], abs=1e-3)
    assert data["val_accuracy_after_prune"] > auto["one_shot_val_accuracy"] + 25 and data["alive"]["alive"]
    assert [r["step"] for r in data["steps"]] == [1, 2, 3, 4, 5] and data["recovery"]["epochs"] == 1
    assert data["channel_ratio"] == pytest.approx(0.6)
    assert "5 steps" in ctx.ledger[-1].notes["auto_steps"]
    assert (tmp_path / "auto" / "stages" / "prune" / "auto-steps" / "step1" / "best.pt").is_file()


def test_a_one_shot_cut_that_cripples_an_alive_student_is_redone_in_steps(trained_resnet, digits8, tmp_path):
    """Above chance is not enough: a one-shot student that keeps less than auto_steps_below of the unpruned
    student's accuracy above chance is pruned again in steps (HF MobileNetV2 at 50%: 25% val against an 87%
    teacher, 19% kept, which 4 distillation epochs could not recover). Here the bar is set above what a 30% cut
    keeps, so the retry must happen although the student is alive; with the bar at 0 it must not."""
    from edgekd.train.guard import kept_share

    assert kept_share(25.0, 87.0, 10.0) == pytest.approx(15 / 77) and kept_share(50.0, 9.0, 10.0) == 1.0
    ctx = _run_prune_stage(PruneConfig(ratio=0.3, probe=None, auto_steps=2, auto_steps_below=1.0), trained_resnet,
                           digits8, tmp_path / "bar")
    data = ctx.report_data["prune"]
    auto = data["auto_steps"]
    assert auto is not None and auto["steps"] == 2 and data["alive"]["alive"]
    assert auto["kept_share"] < 1.0 and "keeping" in auto["why"] and "auto_steps_below: 1" in auto["why"]
    assert auto["unpruned_val_accuracy"] > auto["one_shot_val_accuracy"]
    kept = auto["stepped_val_accuracy"] if auto["kept"] == "stepped" else auto["one_shot_val_accuracy"]
    assert data["val_accuracy_after_prune"] == pytest.approx(kept, abs=1e-3)  # the better of the two is kept
    assert "kept above chance" in ctx.ledger[-1].notes["auto_steps"]
    off = _run_prune_stage(PruneConfig(ratio=0.3, probe=None, auto_steps_below=0.0), trained_resnet, digits8,
                           tmp_path / "off")
    assert off.report_data["prune"]["auto_steps"] is None  # alive, and the bar is only "at chance"
