"""Peak memory of loading and running a model, measured in a fresh subprocess.

What is measured: the peak resident set size (RSS, physical memory the OS gave the process,
native allocations included) of a new Python process while it loads the model in its runtime
and runs one batch three times; and ``model_mib``, that peak minus the process's RSS just before
loading (the interpreter, numpy, torch and the runtime library already imported, the input
batch already allocated). ``model_mib`` is what the model adds: weights, the runtime's copies
and arena, activations. Python's ``tracemalloc`` would miss all of that (it sees only Python
allocations), and measuring in the benchmark's own process would mix in every other model.

On Linux the kernel's high-water mark is reset just before loading (``/proc/self/clear_refs``)
and read from ``VmHWM``; elsewhere ``getrusage`` ``ru_maxrss`` (peak since the process started)
is used, which can overstate ``model_mib`` only when imports peaked higher than loading did.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, Field

from edgekd.errors import EdgekdError, StageError
from edgekd.runtimes.registry import RUNTIMES

#: the library each runtime loads models with (declared by its registry entry), imported before the
#: baseline so that the library's own code and data are not billed to the model
RUNTIME_LIBRARIES: dict[str, str] = {entry.name: entry.library for entry in RUNTIMES.values()}
_MIB = 1024.0 * 1024.0


class MemoryUsage(BaseModel):
    """Memory of one model in one runtime (MiB = 2^20 bytes)."""

    runtime: str
    batch_size: int
    threads: int
    baseline_mib: float = Field(..., description="RSS of the fresh process before loading (interpreter + libraries)")
    peak_mib: float = Field(..., description="peak RSS while loading the model and running the batch")
    model_mib: float = Field(..., description="peak_mib - baseline_mib: what the model itself adds")
    method: str = Field(..., description="how the peak was read (VmHWM after a reset, or ru_maxrss)")


# -- the child process ------------------------------------------------------------------------

def _status_kib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _maxrss_mib() -> float:
    import resource

    peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak / _MIB if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB on Linux


def _child(runtime: str, path: Path, batch_size: int, threads: int, shape: tuple[int, ...],
           factories: tuple[str, ...] = ()) -> dict:
    import contextlib
    import importlib

    import numpy as np

    # The registry imports no runtime library; creating the runtime imports only its own module
    # (an ONNX Runtime process on a device holds no torch, so its baseline should not either).
    engine = RUNTIMES[runtime].create()
    importlib.import_module(RUNTIME_LIBRARIES[runtime])
    trust = contextlib.nullcontext()
    if factories:  # the parent's trust, passed on: a portable .pt may name a user factory. Imported only then
        # (edgekd.models imports torch), and before the baseline is read, so its memory is not the model's
        from edgekd.models.portable import trusted_factories

        trust = trusted_factories(factories)
    batch = np.random.default_rng(0).standard_normal((batch_size, *shape)).astype(np.float32)
    rss_kib = _status_kib("VmRSS")
    hwm_reset = rss_kib is not None and _reset_peak()
    baseline = rss_kib / 1024.0 if hwm_reset else _maxrss_mib()
    with trust:
        model = engine.load(path, threads)
    for _ in range(3):
        model.run(batch)
    if hwm_reset:
        peak, method = (_status_kib("VmHWM") or 0.0) / 1024.0, "VmHWM (reset before loading) - VmRSS before loading"
    else:
        peak, method = _maxrss_mib(), "ru_maxrss after running - ru_maxrss before loading"
    return {"runtime": engine.name, "batch_size": batch_size, "threads": threads, "baseline_mib": round(baseline, 2),
            "peak_mib": round(peak, 2), "model_mib": round(max(0.0, peak - baseline), 2), "method": method}


# -- the parent side --------------------------------------------------------------------------

def measure_peak_memory(path: Path, runtime: str, *, batch_size: int, threads: int, sample_shape: tuple[int, ...],
                        timeout_s: float = 300.0, factories: Iterable[str] | None = None) -> MemoryUsage:
    """Load ``path`` in ``runtime`` in a new Python process, run a batch, and report its memory.

    ``factories``: user factories a portable checkpoint may name (default: those trusted where this is called,
    ``models.portable.trusted_now``); the child sees this process's import path, so it finds them too.
    Raises ``StageError`` when the child fails (its last error line is in the message).
    """
    from edgekd.models.portable import trusted_now

    RUNTIMES[runtime]  # an unknown name fails here, listing the valid ones, not in the child
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding edgekd/
    # this process's own path after the user's: a factory importable here (a recipe's package, a test's
    # module) must be importable there
    parts = [package_root, os.environ.get("PYTHONPATH", ""), *(p for p in sys.path if p and os.path.isdir(p))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(p for p in parts if p))}
    cmd = [sys.executable, "-m", "edgekd.bench.memory", runtime, str(path), "--batch", str(batch_size),
           "--threads", str(threads), "--shape", ",".join(str(s) for s in sample_shape)]
    # only a portable .pt names a factory; other files never rebuild a model, so their child stays torch-free
    if Path(path).suffix == ".pt":
        for factory in sorted(trusted_now() if factories is None else factories):
            cmd += ["--factory", factory]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        raise StageError(f"measuring the memory of {Path(path).name} on {runtime} took over {timeout_s:.0f} s") from exc
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise StageError(f"measuring the memory of {Path(path).name} on {runtime} failed: {last}")
    return MemoryUsage.model_validate(json.loads(lines[-1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="peak memory of loading and running one model (JSON on stdout)")
    parser.add_argument("runtime", choices=RUNTIMES.names(), help="an edgekd runtime name")
    parser.add_argument("path", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shape", required=True, help="one sample's shape, e.g. 1,32,32")
    parser.add_argument("--factory", action="append", default=[], help="a user factory the checkpoint may name")
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    try:
        print(json.dumps(_child(args.runtime, args.path, args.batch, args.threads, shape, tuple(args.factory))))
    except EdgekdError as exc:  # one line, which the parent quotes in its StageError, not a traceback
        print(exc.message if not exc.hint else f"{exc.message} ({exc.hint})", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None


if __name__ == "__main__":
    main()
