"""Runtimes by recipe name and by the artifact format they run.

Importing this module imports no optional package: each runtime imports its library when
it loads a model, so a missing ExecuTorch only matters to recipes that ask for it.
"""

from __future__ import annotations

from edgekd.errors import ConfigError, RuntimeUnavailableError
from edgekd.runtimes.base import Runtime
from edgekd.runtimes.executorch_xnnpack import ExecuTorchRuntime
from edgekd.runtimes.onnxruntime_cpu import OnnxRuntimeCPU
from edgekd.runtimes.ort_mobile import OrtMobileRuntime
from edgekd.runtimes.torch_eager import TorchRuntime

RUNTIMES: dict[str, type[Runtime]] = {
    cls.name: cls for cls in (TorchRuntime, OnnxRuntimeCPU, OrtMobileRuntime, ExecuTorchRuntime)
}

#: the runtime that runs each artifact format ("torch", "onnx", "ort", "pte")
RUNTIME_FOR_FORMAT: dict[str, type[Runtime]] = {cls.fmt: cls for cls in RUNTIMES.values()}


def _checked(cls: type[Runtime]) -> Runtime:
    if not cls.available():
        install = f"pip install 'edgekd[{cls.extra}]'" if cls.extra else "pip install edgekd"
        raise RuntimeUnavailableError(f"the {cls.name} runtime is not installed: {install}")
    return cls()


def get_runtime(name: str) -> Runtime:
    """The runtime called ``name`` in recipes; raises ``RuntimeUnavailableError`` when not installed."""
    try:
        cls = RUNTIMES[name]
    except KeyError:
        raise ConfigError(f"unknown runtime {name!r}", hint=f"valid runtimes: {', '.join(RUNTIMES)}") from None
    return _checked(cls)


def runtime_for_format(fmt: str) -> Runtime:
    """The runtime that runs artifacts of format ``fmt`` (an ``Artifact.fmt``)."""
    try:
        cls = RUNTIME_FOR_FORMAT[fmt]
    except KeyError:
        raise ConfigError(f"no runtime runs artifacts of format {fmt!r}",
                          hint=f"formats with a runtime: {', '.join(RUNTIME_FOR_FORMAT)}") from None
    return _checked(cls)
