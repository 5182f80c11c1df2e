"""``edgekd benchmark MODEL [--against TEACHER]``: benchmark model files outside a recipe.

Each file runs on the parity runtime of its format (``RUNTIME_FOR_FORMAT``: ``.onnx`` ONNX Runtime,
``.ort`` ORT Mobile, ``.pte`` ExecuTorch, ``.pt`` an edgekd portable checkpoint on PyTorch); MODEL and TEACHER are
timed interleaved in one process even when their runtimes differ. Inputs: ``data``, an ``.npz``
with ``x`` (samples shaped like the model's input) and optionally ``y`` (labels, for top-1);
without it, seeded standard-normal samples (edgekd's data are standardised, so these are in
range) give latency, and agreement/KL with the teacher, but no top-1. Params and MACs come from
PyTorch for ``.pt`` and from the ONNX graph's convolutions and matrix products for ``.onnx``
(``edgekd.bench.onnx_counts``); ``.ort`` and ``.pte`` files report none.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from rich.console import Console

from edgekd.bench.config import BenchmarkConfig
from edgekd.bench.engine import BenchInputs, Candidate, TimingGroup, run_benchmark
from edgekd.bench.results import BenchmarkResult
from edgekd.errors import ConfigError, DataError
from edgekd.fileio import atomic_write_json
from edgekd.runtimes.base import LoadedModel
from edgekd.runtimes.registry import RUNTIME_FOR_FORMAT, RUNTIMES, get_runtime

#: file suffix -> artifact format, from the runtime registry's entries (plus ".pth", PyTorch's other spelling)
FORMAT_OF_SUFFIX: dict[str, str] = {**{e.suffix: e.fmt for e in RUNTIMES.values()}, ".pth": "torch"}
#: ONNX operators that only appear in quantized graphs
_INT8_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger",
             "DynamicQuantizeLinear", "QGemm", "QLinearAdd"}
_RANDOM_SAMPLES = 64


def file_format(path: Path) -> str:
    try:
        return FORMAT_OF_SUFFIX[Path(path).suffix.lower()]
    except KeyError:
        raise ConfigError(f"cannot benchmark {Path(path).name}: unknown file type",
                          hint=f"give one of: {', '.join(FORMAT_OF_SUFFIX)}") from None


def file_precision(path: Path, fmt: str) -> str:
    """"int8" for a quantized ONNX graph (by its operators) or a file named *int8*; "fp32" otherwise."""
    if "int8" in Path(path).name.lower():
        return "int8"
    if fmt == "onnx":
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        if any(node.op_type in _INT8_OPS for node in graph.node):
            return "int8"
    return "fp32"


def _sample_shape(loaded: LoadedModel, path: Path, fmt: str) -> tuple[int, ...] | None:
    """One sample's shape as the file declares it (None when a dimension is symbolic)."""
    if fmt == "torch":
        from edgekd.models.portable import load_portable

        return tuple(int(s) for s in load_portable(path)[1]["input_shape"])
    shape = getattr(loaded, "sample_shape", None)  # ExecuTorch: planned sizes
    if shape is None:
        shape = tuple(getattr(loaded, "input_shape", [None])[1:])  # ONNX Runtime: the graph's input
    return tuple(int(s) for s in shape) if all(isinstance(s, int) for s in shape) else None


def _portable_counts(path: Path) -> tuple[int | None, int | None]:
    import torch

    from edgekd.models.portable import load_portable
    from edgekd.models.stats import count_params_macs

    model, meta = load_portable(path)
    return count_params_macs(model, torch.zeros((1, *meta["input_shape"])))


def _onnx_counts(path: Path) -> tuple[int | None, int | None]:
    from edgekd.bench.onnx_counts import onnx_params_macs

    return onnx_params_macs(path)


#: how params and MACs per sample are counted per format; .ort and .pte keep no graph we can count
COUNTERS = {"torch": _portable_counts, "onnx": _onnx_counts}


def _counts(path: Path, fmt: str) -> tuple[int | None, int | None]:
    counter = COUNTERS.get(fmt)
    return counter(path) if counter else (None, None)


def _inputs(data: Path | None, shape: tuple[int, ...], reference: Path | None, reference_fmt: str | None
            ) -> BenchInputs:
    if data is not None:
        try:
            with np.load(data) as arrays:
                x = np.ascontiguousarray(arrays["x"], dtype=np.float32)
                y = np.asarray(arrays["y"], dtype=np.int64) if "y" in arrays.files else None
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"cannot read samples from {data}: {exc}",
                            hint="give an .npz with an array 'x' (samples) and optionally 'y' (labels)") from exc
        if tuple(x.shape[1:]) != shape:
            raise DataError(f"{data} holds samples shaped {tuple(x.shape[1:])}, the model takes {shape}")
        description = f"samples from {Path(data).name}"
    else:
        x = np.random.default_rng(0).standard_normal((_RANDOM_SAMPLES, *shape)).astype(np.float32)
        y = None
        description = f"{_RANDOM_SAMPLES} seeded standard-normal samples (no data given)"
    logits = None
    ref_text = None
    if reference is not None and reference_fmt is not None:
        loaded = get_runtime(RUNTIME_FOR_FORMAT[reference_fmt].name).load(reference, threads=1)
        logits = loaded.run_in_batches(x, 64)
        del loaded
        ref_text = f"{reference.name} on {RUNTIME_FOR_FORMAT[reference_fmt].name}"
    return BenchInputs(x=x, labels=y, reference_logits=logits, description=description,
                       reference_description=ref_text)


def benchmark_files(model: Path, against: Path | None = None, *, threads: list[int] | None = None,
                    batch_sizes: list[int] | None = None, warmup: int = 5, min_time_s: float = 1.0,
                    min_iters: int = 20, data: Path | None = None, memory: bool = True, peak: bool = True,
                    out: Path | None = None, console: Console | None = None,
                    factories: Iterable[str] = ()) -> BenchmarkResult:
    """Benchmark ``model`` (as the student) against ``against`` (the teacher); returns the result.

    With ``out`` (a folder) it writes ``benchmark.json`` there plus ``report.json/md/html``.
    Raises ``ConfigError`` for an unknown file type or bad settings, ``StageError`` for a file
    its runtime cannot load. ``factories``: user factories a ``.pt`` file may name (any other is
    refused: a file never chooses code to run).
    """
    from edgekd.models.portable import trusted_factories

    with trusted_factories(factories):
        return _benchmark_files(model, against, threads=threads, batch_sizes=batch_sizes, warmup=warmup,
                                min_time_s=min_time_s, min_iters=min_iters, data=data, memory=memory, peak=peak,
                                out=out, console=console)


def _benchmark_files(model: Path, against: Path | None, *, threads: list[int] | None, batch_sizes: list[int] | None,
                     warmup: int, min_time_s: float, min_iters: int, data: Path | None, memory: bool, peak: bool,
                     out: Path | None, console: Console | None) -> BenchmarkResult:
    files = [("student", Path(model))] + ([("teacher", Path(against))] if against is not None else [])
    candidates = []
    shape = None
    for role, path in files:
        if not path.is_file():
            raise ConfigError(f"{path} does not exist")
        fmt = file_format(path)
        runtime = RUNTIME_FOR_FORMAT[fmt].name
        probe = get_runtime(runtime).load(path, threads=1)
        file_shape = _sample_shape(probe, path, fmt)
        del probe  # an ExecuTorch model pins the thread pool while alive
        if shape is None:
            shape = file_shape
        elif file_shape is not None and file_shape != shape:
            raise ConfigError(f"{path.name} takes samples shaped {file_shape} but {files[0][1].name} takes {shape}")
        params, macs = _counts(path, fmt)
        candidates.append(Candidate(runtime=runtime, role=role, precision=file_precision(path, fmt), path=path,
                                    params=params, macs=macs))
    if shape is None:
        raise ConfigError("the models' input shapes are symbolic beyond the batch axis, so no input can be made",
                          hint="export with a fixed sample shape")
    try:
        config = BenchmarkConfig(runtimes=list(dict.fromkeys(c.runtime for c in candidates)),
                                 threads=threads or [1], batch_sizes=batch_sizes or [1], warmup=warmup,
                                 min_time_s=min_time_s, min_iters=min_iters, memory=memory, peak=peak)
    except ValueError as exc:
        raise ConfigError(f"bad benchmark option: {exc}") from exc
    teacher = next((c for c in candidates if c.role == "teacher"), None)
    inputs = _inputs(data, shape, teacher.path if teacher else None,
                     file_format(teacher.path) if teacher else None)
    # the teacher first, so each round times it before the student
    group = TimingGroup(name="files", candidates=sorted(candidates, key=lambda c: c.role != "teacher"))
    result = run_benchmark([group], config, inputs, source="files", console=console)
    result.settings["files"] = {c.role: str(c.path) for c in candidates}
    if out is not None:
        from edgekd.report.build import write_all_reports

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "benchmark.json", result.to_json())
        write_all_reports(out)
    return result
