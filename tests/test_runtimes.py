"""Every runtime loads a real exported model, sets its threads, and matches PyTorch on real data.

The MNIST-1D paper's small CNN (three Conv1d+BatchNorm layers) is trained for three quick epochs
on MNIST-1D so BatchNorm has real statistics and the logits mean something, then exported once
per format for the whole module. (The pruned ResNet-20 path is covered in test_export.py.)
"""

from __future__ import annotations

import gc
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgekd.errors import ConfigError, ModelError, ParityError, StageError
from edgekd.export.executorch_export import export_pte
from edgekd.export.onnx_export import export_onnx
from edgekd.export.ort_format import convert_to_ort
from edgekd.export.parity import check_parity
from edgekd.models.portable import save_portable
from edgekd.models.spec import ModelSpec
from edgekd.runtimes.executorch_xnnpack import threadpool_size
from edgekd.runtimes.registry import RUNTIME_FOR_FORMAT, RUNTIMES, get_runtime, runtime_for_format
from edgekd.runtimes.torch_eager import TorchRuntime
from tests.training import train_briefly

SPEC = ModelSpec(model="cnn1d")


def _trained(data, *, epochs: int = 3, seed: int = 0) -> torch.nn.Module:
    """A real, deterministic little model: about 70% top-1 on MNIST-1D after three epochs."""
    torch.manual_seed(seed)
    model = SPEC.build(data.num_classes, data.input_shape)
    return train_briefly(model, data, torch.optim.Adam(model.parameters(), lr=3e-3), epochs,
                         loader_seed=lambda epoch: seed + epoch)


@pytest.fixture(scope="module")
def signals():
    from edgekd.data import mnist1d_bundle

    return mnist1d_bundle(num_samples=3000)


@pytest.fixture(scope="module")
def model(signals):
    return _trained(signals)


@pytest.fixture(scope="module")
def artifacts(model, signals, tmp_path_factory):
    root = tmp_path_factory.mktemp("runtimes")
    example = signals.example_batch(2)
    paths = {"torch": root / "model.pt", "onnx": root / "model.onnx", "ort": root / "model.ort",
             "pte": root / "model.pte"}
    save_portable(model, paths["torch"], spec=SPEC, num_classes=signals.num_classes, input_shape=signals.input_shape)
    export_onnx(model, example, paths["onnx"])
    convert_to_ort(paths["onnx"], paths["ort"])
    export_pte(model, example, paths["pte"], max_batch=64)
    return paths


def test_each_format_keeps_its_parity_runtime():
    """Export parity checks use these; another runtime of a format (a second .onnx runner) never replaces them."""
    assert {fmt: entry.name for fmt, entry in RUNTIME_FOR_FORMAT.items()} == {
        "torch": "torch", "onnx": "onnxruntime", "ort": "ort-mobile", "pte": "executorch"}
    assert type(runtime_for_format("ort")).name == "ort-mobile"
    assert type(runtime_for_format("onnx")).name == "onnxruntime"
    assert RUNTIMES["executorch"].extra == "mobile"
    with pytest.raises(ConfigError, match=f"valid runtimes: {', '.join(RUNTIMES)}$"):
        get_runtime("tflite")


def _without(package: str, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where ``package`` cannot be imported (as if not installed)."""
    blocker = f"import sys; sys.modules[{package!r}] = None\n"  # import and find_spec both see no package
    return subprocess.run([sys.executable, "-c", blocker + code], capture_output=True, text=True, timeout=120,
                          check=False)


def test_missing_runtime_names_the_extra_in_one_line(artifacts):
    proc = _without("executorch", (
        "from edgekd.errors import RuntimeUnavailableError\n"
        "from edgekd.runtimes.registry import get_runtime\n"
        "from edgekd.runtimes.executorch_xnnpack import ExecuTorchRuntime\n"
        "for make in (lambda: get_runtime('executorch'),\n"
        f"             lambda: ExecuTorchRuntime().load({str(artifacts['pte'])!r}, 1)):\n"
        "    try:\n"
        "        make()\n"
        "    except RuntimeUnavailableError as exc:\n"
        "        print(exc.exit_code, str(exc))\n"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [
        "2 the executorch runtime is not installed: pip install 'edgekd[mobile]'"] * 2


@pytest.mark.parametrize("name", RUNTIMES.names())
def test_each_runtime_round_trips_with_parity(name, model, artifacts, signals):
    """Coverage over the registry: every runtime loads a real file of its format and matches PyTorch."""
    entry = RUNTIMES[name]
    if not entry.available():
        pytest.skip(f"{entry.missing_hint} (optional)")
    runtime = get_runtime(name)
    assert type(runtime).name == name and runtime.fmt == entry.fmt and artifacts[entry.fmt].suffix == entry.suffix
    loaded = runtime.load(artifacts[runtime.fmt], threads=1)
    x, y = signals.val_tensors(200)
    result = check_parity(model, loaded, x, atol=1e-4, min_top1_agreement=1.0, label=f"{name} artifact")
    assert result["passed"] and result["samples"] == 200 and result["runtime"] == name
    assert result["max_abs_diff"] <= 1e-4 and result["top1_agreement"] == 1.0
    logits = loaded.run(x[:5].numpy())
    assert logits.shape == (5, 10) and logits.dtype == np.float32
    # the model learned something in its one epoch, so parity is judged on meaningful logits
    accuracy = float((loaded.run_in_batches(x.numpy()).argmax(1) == y.numpy()).mean())
    assert accuracy > 0.5
    del loaded
    gc.collect()


def test_in_memory_torch_model_wraps_without_touching_the_original(model, signals):
    model.train()
    loaded = TorchRuntime.from_module(model, threads=1)
    assert model.training  # the caller's model keeps its mode
    model.eval()
    x = signals.val_tensors(16)[0]
    np.testing.assert_allclose(loaded.run(x.numpy()), model(x).detach().numpy(), atol=1e-6)


def test_threads_are_really_set(artifacts, signals):
    x = signals.val_tensors(4)[0].numpy()
    before = torch.get_num_threads()
    try:
        get_runtime("torch").load(artifacts["torch"], threads=2).run(x)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    ort_model = get_runtime("onnxruntime").load(artifacts["onnx"], threads=2)
    options = ort_model.session.get_session_options()
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    mobile = get_runtime("ort-mobile").load(artifacts["ort"], threads=3)
    mobile_options = mobile.session.get_session_options()
    assert mobile_options.intra_op_num_threads == 3
    assert mobile_options.get_session_config_entry("session.load_model_format") == "ORT"
    gc.collect()
    et = get_runtime("executorch")
    first = et.load(artifacts["pte"], threads=1)
    assert threadpool_size() == 1
    # resizing the process-wide pool under a loaded model would crash: refused with a clear error
    with pytest.raises(StageError, match="cannot switch the XNNPACK thread pool from 1 to 2"):
        et.load(artifacts["pte"], threads=2)
    first.run(x)
    del first
    gc.collect()
    second = et.load(artifacts["pte"], threads=2)
    assert threadpool_size() == 2 and second.run(x).shape == (4, 10)
    del second
    gc.collect()


@pytest.mark.parametrize("name", RUNTIMES.names())
def test_truncated_artifact_is_a_clear_error(name, artifacts, tmp_path):
    if not RUNTIMES[name].available():
        pytest.skip(f"{RUNTIMES[name].missing_hint} (optional)")
    runtime = get_runtime(name)
    fmt = runtime.fmt
    data = artifacts[fmt].read_bytes()
    broken = tmp_path / f"broken{artifacts[fmt].suffix}"
    broken.write_bytes(data[: len(data) // 2])
    # a damaged checkpoint is bad input (exit 2) for the torch runtime, a failed stage for the others
    error, words = (ModelError, "cannot read checkpoint .*broken") if fmt == "torch" else \
        (StageError, f"{runtime.name} cannot load .*broken")
    with pytest.raises(error, match=words):
        runtime.load(broken, threads=1)
    with pytest.raises(StageError, match="does not exist"):
        runtime.load(tmp_path / f"missing{artifacts[fmt].suffix}", threads=1)


def test_wrong_artifact_or_input_is_a_clear_error(artifacts, tmp_path):
    with pytest.raises(StageError, match="ort-mobile runs .ort files"):
        get_runtime("ort-mobile").load(artifacts["onnx"], threads=1)
    pte_as_onnx = tmp_path / "model.onnx"
    pte_as_onnx.write_bytes(artifacts["pte"].read_bytes())
    with pytest.raises(StageError, match="onnxruntime cannot load"):
        get_runtime("onnxruntime").load(pte_as_onnx, threads=1)
    longer = np.zeros((2, 1, 80), dtype=np.float32)  # signals twice as long as the model was exported for
    with pytest.raises(StageError, match="exported for another input shape"):
        get_runtime("onnxruntime").load(artifacts["onnx"], threads=1).run(longer)
    et_model = get_runtime("executorch").load(artifacts["pte"], threads=threadpool_size())
    with pytest.raises(StageError, match=r"takes batches shaped \(1\.\.64, 1, 40\)"):
        et_model.run(longer)
    with pytest.raises(StageError, match="larger max batch"):
        et_model.run(np.zeros((65, 1, 40), dtype=np.float32))
    del et_model
    gc.collect()


def test_parity_error_lists_the_numbers(model, artifacts, signals):
    other = _trained(signals, epochs=1, seed=1)  # another model, as a wrong artifact would be
    loaded = get_runtime("onnxruntime").load(artifacts["onnx"], threads=1)
    with pytest.raises(ParityError) as info:
        check_parity(other, loaded, signals.val_tensors(64)[0], atol=1e-3, min_top1_agreement=0.99, label="model.onnx")
    (row,) = info.value.outputs
    assert row["output"] == "logits" and row["max_abs_diff"] > 1e-3
    assert 0.0 <= row["top1_agreement"] < 1.0
    assert "max abs diff" in info.value.message and "top-1 agreement" in info.value.message


def test_running_a_pte_does_not_import_the_executorch_compiler(artifacts, signals):
    """A process that only runs .pte files must not pay for executorch.exir (7 s and ~100 MB here)."""
    code = ("import sys, numpy as np\n"
            "from edgekd.runtimes.executorch_xnnpack import ExecuTorchRuntime\n"
            f"model = ExecuTorchRuntime().load({str(artifacts['pte'])!r}, 1)\n"
            f"out = model.run(np.zeros((2, {', '.join(map(str, signals.input_shape))}), dtype=np.float32))\n"
            "assert out.shape == (2, 10), out.shape\n"
            "print(sorted(m for m in sys.modules if m.startswith('executorch.exir')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    # ExecuTorch's thread-pool start-up chatter stays off the user's terminal
    assert "cpuinfo_utils" not in proc.stderr and "Resetting threadpool" not in proc.stderr, proc.stderr


def test_native_stderr_filter_drops_chatter_and_keeps_everything_else():
    """fd-level capture: what a C++ library writes to fd 2 still reaches stderr unless it is chatter."""
    code = ("import os, sys\n"
            "from edgekd.runtimes.native_log import filtered_native_stderr\n"
            "with filtered_native_stderr():\n"
            "    os.write(2, b'[threadpool.cpp:66] Resetting threadpool to 1 threads.\\n')\n"
            "    os.write(2, b'[cpuinfo_utils.cpp:87] Failed to open midr file x\\n')\n"
            "    os.write(2, b'E 00:00 XNNPACK delegate: a real failure\\n')\n"
            "    print('python stderr line', file=sys.stderr)\n"
            "os.write(2, b'after\\n')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert proc.stderr.splitlines() == ["E 00:00 XNNPACK delegate: a real failure", "python stderr line", "after"]
