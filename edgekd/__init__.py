"""edgekd: prune, distill, quantize, export and benchmark PyTorch models for edge deployment.

The Python API mirrors the command line (see ``edgekd.api`` and docs/api.md)::

    import edgekd
    result = edgekd.compress("recipes/quickstart.yaml", out="runs/qs")   # or a dict / Recipe
    result.passed, result.gate.message, result.report.ledger
    edgekd.validate(recipe); edgekd.export(pt_file, "onnx"); edgekd.benchmark(onnx_file)

The API functions are imported on first use, so ``import edgekd`` (and every CLI start) stays fast.
"""

from __future__ import annotations

import sys
import types

__version__ = "0.1.0"

_API = ("compress", "validate", "benchmark", "RunResult", "ValidationSummary", "load")
__all__ = ["__version__", "export", *_API]


def __getattr__(name: str):
    if name in _API:
        from edgekd import api

        return getattr(api, name)
    if name == "export":  # the subpackage, made callable below
        import edgekd.export  # noqa: F401  (importing it sets the attribute through _Package.__setattr__)

        return sys.modules["edgekd.export"]
    raise AttributeError(f"module 'edgekd' has no attribute {name!r}")


class _CallableExport(types.ModuleType):
    """``edgekd.export`` is both the subpackage (``edgekd.export.stage``, ...) and ``edgekd.api.export``:
    calling the package calls the function. Python sets a subpackage as its parent's attribute on import,
    so a plain function named ``export`` here would be replaced by the package."""

    def __call__(self, *args, **kwargs):
        from edgekd.api import export

        return export(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name == "export" and isinstance(value, types.ModuleType) and not isinstance(value, _CallableExport):
            value.__class__ = _CallableExport
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
