"""Every export format, by the name recipes use (``export.formats``), with what the rest of edgekd
needs to know about it.

One ``ExportFormatEntry`` per format declares its file suffix, the function that makes it (as
``module:function``, imported only when a file is made, so loading a recipe imports no exporter), the
format it is converted from, the companion files written beside it, and the exporter facts copied into
the export stage's summary. Derived from ``EXPORT_FORMATS``: the recipe's ``ExportFormat`` Literal and
the order files are made in (``FORMAT_ORDER``, sources first) in export/config.py, the file names and
dispatch of the export stage, ``edgekd export --to``. The runtime that checks a format's parity is the
runtime registry's parity entry for the same name (``edgekd.runtimes.registry.RUNTIME_FOR_FORMAT``);
a test holds the suffixes of the two registries equal.

Adding a format is one maker function and one entry below (and a runtime entry that runs it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgekd.registry import Registry


@dataclass(frozen=True)
class ExportFormatEntry:
    """What edgekd knows about one export format without importing its exporter."""

    #: the name in ``export.formats`` and ``Artifact.fmt``
    name: str
    #: the artifact's file suffix (``<role><suffix>`` in ``artifacts/``)
    suffix: str
    #: "package.module:function" taking an ``ExportJob`` and returning the exporter's facts (a dict)
    maker: str
    #: a few words for docs and the recipe's field description
    summary: str
    #: the format this one is converted from (made first; this one cannot be made when it failed)
    source: str | None = None
    #: suffixes of files written beside the artifact (moved aside with it when it fails)
    companions: tuple[str, ...] = ()
    #: exporter facts (keys of the artifact's info) copied into the export stage's summary rows
    summary_keys: tuple[str, ...] = ()

    def make(self, job: Any) -> dict[str, Any]:
        """Make ``job``'s file in this format (``job``: an ``edgekd.export.makers.ExportJob``)."""
        module, _, function = self.maker.partition(":")
        maker: Callable[[Any], dict[str, Any]] = getattr(importlib.import_module(module), function)
        return maker(job)


EXPORT_FORMATS: Registry[ExportFormatEntry] = Registry("export format", [
    ExportFormatEntry("onnx", ".onnx", "edgekd.export.makers:make_onnx",
                      summary="ONNX (torch.export-based exporter), for ONNX Runtime and OpenVINO",
                      companions=(".codebook.onnx",),
                      summary_keys=("exporter", "opset", "nodes", "batchnorm_nodes", "codebook_file", "codebook_layers",
                                    "codebook_bytes")),
    ExportFormatEntry("ort", ".ort", "edgekd.export.makers:make_ort",
                      summary="ORT format for ORT Mobile, converted from the .onnx", source="onnx",
                      companions=(".required_operators.config",), summary_keys=("target_platform",)),
    ExportFormatEntry("pte", ".pte", "edgekd.export.makers:make_pte",
                      summary="ExecuTorch program lowered to XNNPACK",
                      summary_keys=("delegated_nodes", "non_delegated_nodes", "delegated_share", "max_batch")),
])


def _sources_first(registry: Registry[ExportFormatEntry]) -> tuple[str, ...]:
    """The names in registration order, checked so that every format comes after its source."""
    seen: list[str] = []
    for entry in registry.values():
        if entry.source is not None and entry.source not in seen:
            raise ValueError(f"export format {entry.name!r} is made from {entry.source!r}, which must be "
                             f"registered before it")
        seen.append(entry.name)
    return tuple(seen)


#: the order artifacts are made in: a format after the one it is converted from
FORMAT_ORDER: tuple[str, ...] = _sources_first(EXPORT_FORMATS)
