"""Every inference runtime, by the name recipes use, with all the facts the rest of edgekd needs.

One ``RuntimeEntry`` per runtime declares its name, the artifact format and file suffix it runs,
the class that runs it (as ``module:Class``, imported only when a model is loaded), the library it
imports, the pip extra that installs it, its plot marker, and whether it is the parity runtime of
its format (the one export checks and ``runtime_for_format`` use). Derived from ``RUNTIMES``:
the recipe's ``RuntimeName`` (bench/config.py), the libraries the memory probe pre-imports
(bench/memory.py), the plot markers (report/plots.py), the install hints and ``RUNTIME_FOR_FORMAT``.

Adding a runtime is one module under ``edgekd/runtimes/`` and one entry below. Importing this
module imports no runtime library (not even torch): each runtime imports its own when it loads.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgekd.errors import RuntimeUnavailableError
from edgekd.registry import Registry

if TYPE_CHECKING:
    from edgekd.runtimes.base import Runtime


@dataclass(frozen=True)
class RuntimeEntry:
    """What edgekd knows about one runtime without importing it."""

    #: the id recipes, reports and ``LoadedModel.runtime`` use
    name: str
    #: the artifact format it runs ("torch", "onnx", "ort", "pte"), as ``Artifact.fmt`` names it
    fmt: str
    #: the artifact's file suffix
    suffix: str
    #: the ``Runtime`` subclass, "package.module:Class" (imported on first use)
    impl: str
    #: the module it loads models with: its top-level package decides whether the runtime is
    #: installed, and the memory probe imports it before measuring its baseline
    library: str
    #: the pip extra of edgekd that installs it (None: a core dependency)
    extra: str | None
    #: matplotlib marker of its points in the accuracy/latency plot
    marker: str
    #: True for the one runtime per format that export parity checks and ``runtime_for_format`` use
    parity: bool = False
    #: in ``benchmark.runtimes`` when a recipe does not list runtimes
    default: bool = True
    #: a few words for the recipe's field description ("ONNX Runtime CPU")
    summary: str = ""

    @property
    def package(self) -> str:
        return self.library.split(".", 1)[0]

    @property
    def install(self) -> str:
        """The pip command that installs this runtime."""
        return f"pip install 'edgekd[{self.extra}]'" if self.extra else "pip install edgekd"

    @property
    def missing_hint(self) -> str:
        """The one-line message for a runtime whose package is missing."""
        return f"the {self.name} runtime is not installed: {self.install}"

    def package_installed(self) -> bool:
        """True when the runtime's package can be found (it is not imported)."""
        try:
            return importlib.util.find_spec(self.package) is not None
        except (ImportError, ValueError):  # a broken or half-removed installation
            return False

    def runtime_class(self) -> type[Runtime]:
        module, _, cls = self.impl.partition(":")
        return getattr(importlib.import_module(module), cls)

    def available(self) -> bool:
        """True when the runtime can load models here (asks the class: ``Runtime.available``)."""
        return self.package_installed() and self.runtime_class().available()

    def create(self) -> Runtime:
        """An instance of the runtime; ``RuntimeUnavailableError`` (one line, exit 2) when not installed."""
        if not self.available():
            raise RuntimeUnavailableError(self.missing_hint)
        return self.runtime_class()()


RUNTIMES: Registry[RuntimeEntry] = Registry("runtime", [
    RuntimeEntry("torch", "torch", ".pt", "edgekd.runtimes.torch_eager:TorchRuntime", library="torch",
                 extra=None, marker="o", parity=True, summary="PyTorch eager on the portable .pt"),
    RuntimeEntry("onnxruntime", "onnx", ".onnx", "edgekd.runtimes.onnxruntime_cpu:OnnxRuntimeCPU",
                 library="onnxruntime", extra=None, marker="s", parity=True, summary="ONNX Runtime CPU"),
    RuntimeEntry("ort-mobile", "ort", ".ort", "edgekd.runtimes.ort_mobile:OrtMobileRuntime",
                 library="onnxruntime", extra=None, marker="D", parity=True,
                 summary="ONNX Runtime with mobile session options"),
    # not portable_lib: see runtimes.executorch_xnnpack._bindings
    RuntimeEntry("executorch", "pte", ".pte", "edgekd.runtimes.executorch_xnnpack:ExecuTorchRuntime",
                 library="executorch.extension.pybindings._C", extra="mobile", marker="^", parity=True,
                 summary="ExecuTorch with XNNPACK"),
    RuntimeEntry("openvino", "onnx", ".onnx", "edgekd.runtimes.openvino_cpu:OpenVinoRuntime", library="openvino",
                 extra="openvino", marker="P", default=False, summary="OpenVINO CPU plugin"),
])


def parity_runtimes(entries: Iterable[RuntimeEntry]) -> dict[str, RuntimeEntry]:
    """The parity runtime of each format among ``entries``; ``ValueError`` when a format has none or two
    (a second runtime for ``.onnx`` is added with ``parity=False`` and leaves onnxruntime in place)."""
    entries = list(entries)
    by_format: dict[str, RuntimeEntry] = {}
    for entry in entries:
        if entry.parity:
            if entry.fmt in by_format:
                raise ValueError(f"format {entry.fmt!r} has two parity runtimes: {by_format[entry.fmt].name} "
                                 f"and {entry.name}")
            by_format[entry.fmt] = entry
    missing = {e.fmt for e in entries} - set(by_format)
    if missing:
        raise ValueError(f"no parity runtime for format(s) {', '.join(sorted(missing))}")
    return by_format


#: the parity runtime of each artifact format ("torch", "onnx", "ort", "pte"): export checks use it
RUNTIME_FOR_FORMAT: dict[str, RuntimeEntry] = parity_runtimes(RUNTIMES.values())


def get_runtime(name: str) -> Runtime:
    """The runtime called ``name`` in recipes. Raises ``ConfigError`` (``UnknownNameError``) listing
    the valid names for an unknown one, ``RuntimeUnavailableError`` when it is not installed."""
    return RUNTIMES[name].create()


def runtime_for_format(fmt: str) -> Runtime:
    """The parity runtime of artifacts of format ``fmt`` (an ``Artifact.fmt``)."""
    try:
        entry = RUNTIME_FOR_FORMAT[fmt]
    except KeyError:
        from edgekd.errors import ConfigError

        raise ConfigError(f"no runtime runs artifacts of format {fmt!r}",
                          hint=f"formats with a runtime: {', '.join(RUNTIME_FOR_FORMAT)}") from None
    return entry.create()
