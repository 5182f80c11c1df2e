"""Library versions recorded in the manifest and the report."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("edgekd", "torch", "torch-pruning", "onnx", "onnxscript", "onnxruntime", "onnxslim", "executorch",
            "numpy", "pydantic")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
