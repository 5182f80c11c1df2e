"""The benchmark harness, accuracy metrics, machine facts, memory and the `edgekd benchmark` command."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from edgekd.bench.accuracy import evaluate_loaded, kl_divergence, metrics_from_logits
from edgekd.bench.config import BenchmarkConfig
from edgekd.bench.latency import LatencyStats, measure, measure_interleaved, paired_speedup
from edgekd.bench.machine import ISA_FLAGS, describe_machine, machine_facts
from edgekd.report.config import GateConfig


class FakeClock:
    """A clock that only moves when a candidate 'runs', by a known amount: exact statistics."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def work(self, seconds: float):
        def call() -> None:
            self.now += seconds
        return call


# -- the harness ---------------------------------------------------------------------------------

def test_statistics_are_exact_on_known_durations():
    clock = FakeClock()
    durations = iter([0.001 * (i % 10 + 1) for i in range(1000)])  # 1..10 ms, repeating

    def call() -> None:
        clock.now += next(durations)

    stats = measure(call, warmup=0, min_time_s=0.0, min_iters=100, batch_size=4, clock=clock)
    expected = np.array([1.0 * (i % 10 + 1) for i in range(100)])
    assert stats.iters == 100
    assert stats.p50_ms == pytest.approx(np.percentile(expected, 50))
    assert stats.p90_ms == pytest.approx(np.percentile(expected, 90))
    assert stats.p99_ms == pytest.approx(np.percentile(expected, 99))
    assert stats.mean_ms == pytest.approx(5.5)
    assert stats.std_ms == pytest.approx(expected.std(ddof=1))
    assert (stats.min_ms, stats.max_ms) == pytest.approx((1.0, 10.0))
    assert stats.throughput_sps == pytest.approx(4 / 0.0055)
    assert "samples_ms" not in stats.to_json() and stats.to_json()["p50_ms"] == stats.p50_ms


def test_no_p99_from_fewer_than_100_calls():
    from edgekd.bench.latency import MIN_ITERS_P99

    clock = FakeClock()
    durations = iter([0.001 * (i % 10 + 1) for i in range(1000)])

    def call() -> None:
        clock.now += next(durations)

    few = measure(call, warmup=0, min_time_s=0.0, min_iters=MIN_ITERS_P99 - 1, clock=clock)
    # of 99 calls the "99th percentile" is their slowest: not stored (and the report prints "—")
    assert few.iters == 99 and few.p99_ms is None and few.p90_estimated and few.to_json()["p99_ms"] is None
    assert measure(call, warmup=0, min_time_s=0.0, min_iters=5, clock=clock).p90_estimated is False


def test_stop_rule_counts_rounds_and_the_slowest_candidates_time():
    clock = FakeClock()
    stats = measure_interleaved({"slow": clock.work(0.010), "fast": clock.work(0.001)}, warmup=3,
                                min_time_s=0.5, min_iters=10, batch_size=1, clock=clock)
    # 0.5 s of the 10 ms candidate = 50 rounds; the fast one gets the same 50 paired samples
    assert stats["slow"].iters == stats["fast"].iters == 50
    assert stats["slow"].warmup == 3
    assert paired_speedup(stats["slow"], stats["fast"]) == pytest.approx(10.0)
    few = measure_interleaved({"a": clock.work(0.001)}, warmup=0, min_time_s=0.0, min_iters=7, clock=clock)
    assert few["a"].iters == 7


def test_rounds_are_interleaved_and_rotate():
    calls: list[str] = []
    candidates = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    measure_interleaved(candidates, warmup=2, min_time_s=0.0, min_iters=4)
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert len(rounds) == 6  # 2 warm-up rounds, then 4 timed
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # every round runs each candidate once
    assert [r[0] for r in rounds] == ["a", "b", "a", "b", "c", "a"]  # the start rotates
    assert rounds[1] == ["b", "c", "a"] and rounds[4] == ["c", "a", "b"]


def test_a_sleep_of_known_length_is_measured_at_least_that_long():
    # real clock: sleeping 3 ms can only take longer, never shorter; the upper bound is loose on purpose
    stats = measure(lambda: time.sleep(0.003), warmup=1, min_time_s=0.0, min_iters=10)
    assert 3.0 <= stats.p50_ms < 3.0 + 20.0
    assert stats.min_ms >= 3.0


def test_harness_rejects_bad_arguments():
    with pytest.raises(ValueError):
        measure_interleaved({}, min_iters=1)
    with pytest.raises(ValueError):
        measure(lambda: None, min_iters=0)
    with pytest.raises(ValueError):
        LatencyStats.from_samples([], warmup=0, batch_size=1)


# -- configs ---------------------------------------------------------------------------------------

def test_benchmark_config_validation():
    cfg = BenchmarkConfig(threads=[2, 1], batch_sizes=[32, 1])
    assert cfg.threads == [1, 2] and cfg.batch_sizes == [1, 32]
    for bad in ({"threads": [0]}, {"threads": [1, 1]}, {"runtimes": ["tflite"]}, {"runtimes": []},
                {"warmup": -1}, {"min_iters": 0}, {"accuracy_samples": 0}, {"typo": 1}):
        with pytest.raises(ValidationError):
            BenchmarkConfig(**bad)
    assert GateConfig(max_accuracy_drop=1.0).max_accuracy_drop == 1.0
    with pytest.raises(ValidationError):
        GateConfig(max_accuracy_drop=-1)


# -- accuracy -------------------------------------------------------------------------------------

def test_kl_matches_torch_and_metrics_count_correctly():
    rng = np.random.default_rng(0)
    teacher, student = rng.standard_normal((50, 10)), rng.standard_normal((50, 10))
    expected = torch.nn.functional.kl_div(torch.log_softmax(torch.tensor(student), 1),
                                          torch.log_softmax(torch.tensor(teacher), 1), log_target=True,
                                          reduction="none").sum(1).numpy()
    np.testing.assert_allclose(kl_divergence(teacher, student), expected, rtol=1e-9, atol=1e-12)
    assert np.allclose(kl_divergence(teacher, teacher), 0.0)
    labels = teacher.argmax(1)
    labels[:5] = (labels[:5] + 1) % 10
    m = metrics_from_logits(teacher, labels, teacher)
    assert m.top1_pct == pytest.approx(90.0) and m.agreement_pct == 100.0 and m.kl_mean == pytest.approx(0.0)
    assert metrics_from_logits(student, None, None).top1_pct is None


def _train_mlp(bundle, hidden: int, steps: int = 150) -> nn.Module:
    from edgekd.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", num_classes=bundle.num_classes, input_shape=bundle.input_shape, hidden=hidden)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = bundle.train_x, bundle.train_y
    for step in range(steps):
        idx = torch.arange(step * 64, step * 64 + 64) % len(x)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_accuracy_of_a_loaded_model_matches_pytorch(digits8):
    from edgekd.models.evaluate import top1_accuracy
    from edgekd.runtimes.torch_eager import TorchRuntime

    model = _train_mlp(digits8, hidden=32)
    x, y = digits8.val_tensors()
    metrics, logits = evaluate_loaded(TorchRuntime.from_module(model, threads=1), x.numpy(), y.numpy(),
                                      model(x).detach().numpy(), batch_size=50)
    assert metrics.samples == len(x) and logits.shape == (len(x), 10)
    assert metrics.top1_pct == pytest.approx(top1_accuracy(model, x, y), abs=1e-4)  # float32 mean there
    assert metrics.top1_pct > 80 and metrics.agreement_pct == 100.0 and metrics.kl_mean < 1e-9


# -- machine facts and peak --------------------------------------------------------------------------

def test_machine_facts_name_the_cpu_and_versions():
    facts = machine_facts()
    assert set(facts["isa"]) == set(ISA_FLAGS) and all(isinstance(v, bool) for v in facts["isa"].values())
    assert facts["logical_cores"] >= 1 and facts["usable_cores"] >= 1
    assert facts["versions"]["torch"] == torch.__version__.split("+")[0] or facts["versions"]["torch"] == torch.__version__
    assert facts["versions"]["onnxruntime"] and facts["python"]
    if facts["arch"] in ("x86_64", "AMD64"):
        assert facts["isa"]["sse4_2"]  # every x86-64 CPU torch supports has it
    assert facts["arch"] in describe_machine(facts)


def test_gemm_peak_is_positive_per_size():
    from edgekd.bench.peak import achieved_gflops, gemm_peak

    peak = gemm_peak(1, sizes=(64, 128), min_time_s=0.01, min_iters=3)
    assert peak.threads == 1 and peak.size in (64, 128) and set(peak.by_size) == {"64", "128"}
    assert peak.gflops == max(peak.by_size.values()) > 0
    assert achieved_gflops(1_000_000, 10, 2.0) == pytest.approx(10.0)
    assert achieved_gflops(None, 10, 2.0) is None


def test_int8_gemm_peak_runs_u8s8_through_onnxruntime():
    from edgekd.bench.peak import int8_gemm_peak

    peak = int8_gemm_peak(1, sizes=(64, 128), min_time_s=0.01, min_iters=3)
    assert peak.precision == "int8" and "MatMulInteger" in peak.backend and set(peak.by_size) == {"64", "128"}
    assert peak.gflops == max(peak.by_size.values()) > 0


# -- real files: memory and `edgekd benchmark` ----------------------------------------------------------

def _onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    return path


def test_benchmark_files_int8_onnx_against_fp32_teacher(digits8, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgekd.commands.benchmark import benchmark_files
    from edgekd.report.schema import Report

    teacher = _train_mlp(digits8, hidden=64)
    fp32 = _onnx(teacher, digits8.example_batch(2), tmp_path / "teacher.onnx")
    int8 = tmp_path / "student.onnx"  # no "int8" in the name: the precision is read from the graph's operators
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    x, y = digits8.val_tensors()
    np.savez(tmp_path / "val.npz", x=x.numpy(), y=y.numpy())
    out = tmp_path / "bench"
    result = benchmark_files(int8, against=fp32, threads=[1], batch_sizes=[1, 8], warmup=1, min_time_s=0.02,
                             min_iters=5, data=tmp_path / "val.npz", memory=True, peak=True, out=out)
    assert {m.label for m in result.models} == {"teacher", "student-int8"}
    assert all(m.runtime == "onnxruntime" and m.error is None for m in result.models)
    timed = {(t.label, t.batch_size): t for t in result.timings}
    assert set(timed) == {(lab, bs) for lab in ("teacher", "student-int8") for bs in (1, 8)}
    assert all(t.latency is not None and t.latency.iters >= 5 for t in timed.values())
    assert timed[("teacher", 8)].speedup_vs_teacher == pytest.approx(1.0)  # each round's ratio to itself
    assert timed[("student-int8", 8)].speedup_vs_teacher > 0
    t_acc = result.model("onnxruntime", "teacher").accuracy
    s_acc = result.model("onnxruntime", "student-int8").accuracy
    expected = 100.0 * (teacher(x).argmax(1) == y).float().mean().item()
    assert t_acc.top1_pct == pytest.approx(expected, abs=1e-4) and t_acc.agreement_pct == 100.0
    assert s_acc.agreement_pct > 90 and abs(s_acc.top1_pct - t_acc.top1_pct) < 5 and s_acc.kl_mean > 0
    assert result.reference_top1_pct == pytest.approx(expected, abs=1e-4)
    for m in result.models:  # a fresh process loaded and ran the file
        assert m.memory is not None, m.memory_error
        assert m.memory.peak_mib >= m.memory.baseline_mib > 0 and m.memory.model_mib >= 0
        assert m.memory.batch_size == 8
    # params and MACs from the ONNX graphs: the Linear layers' weights and multiply-adds, INT8 or not
    linear = [m for m in teacher.modules() if isinstance(m, nn.Linear)]
    for m in result.models:
        assert m.macs == sum(lin.in_features * lin.out_features for lin in linear)
        assert m.params == sum(p.numel() for p in teacher.parameters())
    assert all(t.gflops > 0 for t in result.timings)
    # each model's rate against the GEMM peak of its own precision: INT8 operations over the INT8 probe
    assert {p.precision for p in result.peaks} == {"fp32", "int8"}
    for t in result.timings:
        assert t.peak_share == pytest.approx(t.gflops / result.peak(1, t.precision).gflops)
    report = Report.model_validate_json((out / "report.json").read_text())
    assert report.benchmark is not None and len(report.comparisons) == 2
    assert "student-int8" in (out / "report.md").read_text()


@pytest.mark.skipif(not __import__("importlib").util.find_spec("executorch"), reason="executorch not installed")
def test_benchmark_files_pte_against_portable_teacher_across_runtimes(digits8, tmp_path):
    from edgekd.commands.benchmark import benchmark_files
    from edgekd.export.executorch_export import export_pte
    from edgekd.models.portable import save_portable
    from edgekd.models.spec import ModelSpec

    spec = ModelSpec(model="mlp", kwargs={"hidden": 48})
    teacher = _train_mlp(digits8, hidden=48, steps=60)
    save_portable(teacher, tmp_path / "teacher.pt", spec=spec, num_classes=10, input_shape=digits8.input_shape)
    export_pte(teacher, digits8.example_batch(2), tmp_path / "student.pte", max_batch=4)
    result = benchmark_files(tmp_path / "student.pte", against=tmp_path / "teacher.pt", threads=[1],
                             batch_sizes=[2, 8], warmup=1, min_time_s=0.01, min_iters=5, memory=False, peak=True)
    assert {(m.runtime, m.label) for m in result.models} == {("torch", "teacher"), ("executorch", "student")}
    teacher_entry = result.model("torch", "teacher")
    assert teacher_entry.macs and teacher_entry.params == sum(p.numel() for p in teacher.parameters())
    timed = {(t.label, t.batch_size): t for t in result.timings}
    assert timed[("student", 2)].latency is not None and timed[("student", 2)].group == "files"
    assert timed[("teacher", 2)].gflops > 0 and timed[("teacher", 2)].peak_share > 0
    assert timed[("student", 8)].latency is None and "at most 4" in timed[("student", 8)].error
    # same weights on both runtimes: the .pte agrees with the teacher (random inputs, no labels)
    student = result.model("executorch", "student").accuracy
    assert student.top1_pct is None and student.agreement_pct > 95 and student.kl_mean < 1e-3


def test_a_runtime_that_is_not_installed_becomes_a_note(digits8, tmp_path, monkeypatch):
    from edgekd.bench.engine import BenchInputs, Candidate, TimingGroup, run_benchmark
    from edgekd.runtimes.executorch_xnnpack import ExecuTorchRuntime

    # simulate a machine without the optional package (the class method is edgekd's own check)
    monkeypatch.setattr(ExecuTorchRuntime, "available", classmethod(lambda cls: False))
    model = _train_mlp(digits8, hidden=16, steps=10)
    path = _onnx(model, digits8.example_batch(2), tmp_path / "m.onnx")
    x = digits8.val_x[:16].numpy()
    inputs = BenchInputs(x=x, labels=None, reference_logits=None, description="val", reference_description=None)
    groups = [TimingGroup("onnxruntime", [Candidate("onnxruntime", "student", "fp32", path)]),
              TimingGroup("executorch", [Candidate("executorch", "student", "fp32", tmp_path / "absent.pte")])]
    cfg = BenchmarkConfig(threads=[1], batch_sizes=[4], warmup=0, min_time_s=0.0, min_iters=3, memory=False,
                          peak=False)
    result = run_benchmark(groups, cfg, inputs, source="files")
    assert [n.runtime for n in result.notes] == ["executorch"]
    assert "not installed" in result.notes[0].message and "edgekd[mobile]" in result.notes[0].message
    assert [m.runtime for m in result.models] == ["onnxruntime"]
    assert result.timings[0].latency is not None and result.timings[0].speedup_vs_teacher is None


def test_memory_probe_loads_a_checkpoint_of_a_trusted_factory(digits8, tmp_path):
    """The memory probe runs in a child process started from a thread pool; a teacher .pt built by a user's
    factory must load there too (the trust given to ``benchmark_files`` / the recipe is passed on through the
    pool's threads, which do not see the caller's context), and an untrusted one is still refused."""
    from edgekd.bench.memory import measure_peak_memory
    from edgekd.commands.benchmark import benchmark_files
    from edgekd.errors import StageError
    from edgekd.models.portable import save_portable
    from edgekd.models.spec import ModelSpec

    factory = "tests.factories:dict_net"
    spec = ModelSpec(factory=factory)
    path = tmp_path / "teacher.pt"
    save_portable(spec.build(10, (1, 8, 8)).eval(), path, spec=spec, num_classes=10, input_shape=(1, 8, 8))
    result = benchmark_files(path, threads=[1], batch_sizes=[2], warmup=0, min_time_s=0.0, min_iters=2,
                             memory=True, peak=False, factories=[factory])
    (entry,) = result.models
    assert entry.memory_error is None and entry.memory is not None, entry.memory_error
    assert entry.memory.runtime == "torch" and entry.memory.peak_mib >= entry.memory.baseline_mib > 0
    with pytest.raises(StageError, match="dict_net"):  # nothing vouches for the factory here
        measure_peak_memory(path, "torch", batch_size=2, threads=1, sample_shape=(1, 8, 8))
    # an ONNX file measured under the same trust: no factory reaches its child (only a .pt names one), so it
    # stays torch-free and its baseline is ONNX Runtime's alone (with torch it read about 17x the model)
    onnx_path = _onnx(spec.build(10, (1, 8, 8)).eval(), torch.zeros(2, 1, 8, 8), tmp_path / "m.onnx")
    onnx_usage = measure_peak_memory(onnx_path, "onnxruntime", batch_size=2, threads=1, sample_shape=(1, 8, 8),
                                     factories=[factory])
    assert onnx_usage.baseline_mib < entry.memory.baseline_mib  # the torch child holds torch; this one does not


def test_fp32_peak_is_the_faster_library_and_never_falls_with_more_threads():
    from edgekd.bench.peak import GemmPeak, at_least_fewer_threads, fp32_gemm_peak

    peak = fp32_gemm_peak(1, sizes=(64, 128), min_time_s=0.01, min_iters=3)
    assert peak.precision == "fp32" and set(peak.by_size) == {"64", "128"}
    assert peak.gflops == max(peak.by_size.values()) > 0 and "faster of torch.mm and onnxruntime" in peak.backend
    # a 2-thread probe that read below 1 thread (another job on the second core) is floored at the 1-thread one
    peaks = {("fp32", 1): GemmPeak(threads=1, gflops=100.0, size=512), ("fp32", 2): GemmPeak(threads=2, gflops=68.0,
             size=512), ("fp32", 4): GemmPeak(threads=4, gflops=300.0, size=512),
             ("int8", 2): GemmPeak(threads=2, gflops=50.0, size=512, precision="int8")}
    floored = at_least_fewer_threads(peaks)
    assert floored[("fp32", 2)].gflops == 100.0 and "below 100.0 at 1" in floored[("fp32", 2)].backend
    assert floored[("fp32", 4)].gflops == 300.0 and floored[("fp32", 1)] == peaks[("fp32", 1)]
    assert floored[("int8", 2)].gflops == 50.0  # precisions are never mixed


def test_the_onnxruntime_memory_probe_never_imports_torch(digits8, tmp_path):
    """A device that runs ONNX Runtime holds no torch: the probe's child must not import it either, or every
    ONNX model's baseline carries torch's ~180 MiB and each probe pays 1.7 s of imports. torch is made
    unimportable in the child; the probe must still measure."""
    import json
    import subprocess
    import sys

    path = _onnx(_train_mlp(digits8, hidden=16, steps=5), digits8.example_batch(2), tmp_path / "m.onnx")
    code = ("import sys; sys.modules['torch'] = None; from edgekd.bench.memory import main; "
            f"main(['onnxruntime', {str(path)!r}, '--batch', '4', '--shape', '1,8,8'])")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    usage = json.loads(proc.stdout.strip().splitlines()[-1])
    assert usage["runtime"] == "onnxruntime" and usage["peak_mib"] >= usage["baseline_mib"] > 0
