"""ExecuTorch with the XNNPACK delegate: a ``.pte`` file run by ExecuTorch's Python runtime.

Threads (what we found in executorch 1.5.1): XNNPACK runs on ExecuTorch's one process-wide
pthreadpool (``executorch::extension::threadpool::get_threadpool()``), created on first use
with one thread per core. Each XNNPACK delegate keeps a raw pointer to that pool when its
program is loaded, and the Python bindings expose no per-model or per-backend thread option.
The only control is ``_unsafe_reset_threadpool(n)``, which destroys the pool and
builds a new one: safe before a program is loaded, and unsafe while any loaded program is
alive (its delegate would keep using the destroyed pool; this is the crash seen on this
machine). So this runtime resizes the pool only when no ExecuTorch model loaded through it is
still alive, and refuses (with a clear error) to load a model with another thread count while
one is. Load all models for one thread count, run them, drop them, then load for the next.
"""

from __future__ import annotations

import functools
import weakref
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from edgekd.errors import StageError
from edgekd.runtimes.base import LoadedModel, Runtime
from edgekd.runtimes.native_log import filtered_native_stderr

#: models loaded through this module that are still referenced; their delegates hold the pool
_LIVE: weakref.WeakSet[ExecuTorchLoadedModel] = weakref.WeakSet()


@functools.cache
def _bindings() -> Any:
    """ExecuTorch's compiled runtime bindings (``executorch.extension.pybindings._C``).

    Imported directly rather than through ``portable_lib`` or ``executorch.runtime``: both re-export
    the same functions, but ``portable_lib`` first imports ``executorch.exir._warnings`` to issue an
    "experimental API" warning, which loads the whole ``executorch.exir`` compiler (and torchao):
    7 s of a 2-core machine's time and ~100 MB in every process that only runs ``.pte`` files.
    torch is imported first because the extension links against libtorch (as ``portable_lib`` does).
    """
    import torch  # noqa: F401  (loads libtorch.so for the extension)
    from executorch.extension.pybindings import _C

    return _C


def threadpool_size() -> int:
    """Threads in ExecuTorch's process-wide pool (the one XNNPACK runs on)."""
    with filtered_native_stderr():  # the first call creates the pool, which logs CPU probing
        return int(_bindings()._threadpool_get_thread_count())


def set_threadpool_size(threads: int) -> None:
    """Resize ExecuTorch's pool; only while no ExecuTorch model loaded through edgekd is alive."""
    if threadpool_size() == threads:
        return
    alive = len(_LIVE)
    if alive:
        raise StageError(
            f"executorch: cannot switch the XNNPACK thread pool from {threadpool_size()} to {threads} threads "
            f"while {alive} ExecuTorch model(s) are loaded (the pool is process-wide and resizing it under a "
            "loaded model crashes)",
            hint="load all models for one thread count, run them, drop them, then load for the next count")
    with filtered_native_stderr():
        _bindings()._unsafe_reset_threadpool(threads)


class ExecuTorchLoadedModel(LoadedModel):
    runtime = "executorch"

    def __init__(self, program: Any, method: Any, threads: int, path: Path) -> None:
        self._program = program  # the method borrows from the program: keep both alive together
        self._method = method
        self.threads = threads
        self.path = path
        meta = method.method_meta()
        if meta.num_inputs() != 1:
            raise StageError(f"executorch: {path} takes {meta.num_inputs()} inputs; edgekd models take one")
        # memory is planned for the upper bound of each dimension: sizes are the largest shape accepted
        sizes = tuple(int(s) for s in meta.input_tensor_meta(0).sizes())
        self.max_batch = sizes[0]
        self.sample_shape = sizes[1:]

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        # The runtime only checks the element count against the planned buffer, so a wrong sample
        # shape with fewer elements would run and return garbage: check the shape here.
        if tuple(x.shape[1:]) != self.sample_shape or not 1 <= x.shape[0] <= self.max_batch:
            raise StageError(f"executorch: {self.path.name} takes batches shaped (1..{self.max_batch}, "
                             f"{', '.join(map(str, self.sample_shape))}), got {tuple(x.shape)}",
                             hint="export with a larger max batch (export.pte_max_batch) or feed smaller batches"
                             if tuple(x.shape[1:]) == self.sample_shape else
                             "the artifact was exported for another input shape")
        try:
            out = self._method([x])
        except RuntimeError as exc:
            raise StageError(f"executorch failed to run {self.path.name}: {exc}") from exc
        return out[0].detach().float().numpy()


class ExecuTorchRuntime(Runtime):
    name: ClassVar[str] = "executorch"

    def _check_header(self, artifact: Path) -> None:
        """Refuse a file without ExecuTorch's flatbuffer identifier before the C++ loader sees it.

        A ``.pte`` starts with a 4-byte root offset, then the file identifier ``ET`` plus two version
        characters (``ET12`` in executorch 1.5). On random bytes the 1.5.1 loader aborts the whole
        process (a C++ ``terminate`` while decoding its own error message), so no exception could be
        caught; truncated files and files with the right identifier fail cleanly in the loader itself.
        """
        with open(artifact, "rb") as handle:
            head = handle.read(8)
        ident = head[4:8]
        if len(head) < 8 or ident[:2] != b"ET" or not ident[2:].isalnum():
            raise self._bad_artifact(artifact, f"no ExecuTorch program identifier (bytes 4-8 are {ident!r}, "
                                               "expected b'ET' and a version such as b'ET12')")

    def load(self, artifact: Path, threads: int) -> ExecuTorchLoadedModel:
        artifact = self._check_file(artifact, threads)
        self._check_header(artifact)
        set_threadpool_size(threads)  # before loading: the delegate captures the pool at load time
        bindings = _bindings()
        try:
            # what executorch.runtime.Runtime.load_program(path) calls, without its heavy import
            program = bindings._load_program(str(artifact), enable_etdump=False, debug_buffer_size=0,
                                             program_verification=bindings.Verification.InternalConsistency,
                                             data_path=None)
            names = {program.get_method_name(i) for i in range(program.num_methods())}
            if "forward" not in names:
                raise StageError(f"executorch: {artifact} has no 'forward' method (it has: {', '.join(sorted(names))})",
                                 hint="export the model with edgekd export MODEL --to pte")
            method = program.load_method("forward")
        except RuntimeError as exc:
            raise self._bad_artifact(artifact, exc) from exc
        loaded = ExecuTorchLoadedModel(program, method, threads, artifact)
        _LIVE.add(loaded)
        return loaded
