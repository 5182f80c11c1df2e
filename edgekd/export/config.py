"""The ``export`` stage's recipe section::

    - export: {formats: [onnx, ort, pte], opset: 18, verify: {samples: 256, atol: 1.0e-3}}

Every artifact is checked against the PyTorch model on real validation samples before it is
handed over; ``verify`` holds the tolerances.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from edgekd.recipe.base import StrictModel

ExportFormat = Literal["onnx", "ort", "pte"]
Role = Literal["teacher", "student"]

#: the order artifacts are made in: ``ort`` is converted from the ``onnx`` file
FORMAT_ORDER: tuple[ExportFormat, ...] = ("onnx", "ort", "pte")


class VerifyConfig(StrictModel):
    """Parity of an exported artifact with the PyTorch model, on real validation samples."""

    samples: int = Field(256, ge=1, le=100_000,
                         description="validation samples run through every artifact (fewer if the split is smaller)")
    atol: float = Field(1e-3, gt=0.0, le=100.0,
                        description="largest absolute logit difference from PyTorch allowed")
    min_top1_agreement: float = Field(0.99, ge=0.0, le=1.0,
                                      description="fraction of samples whose top-1 class must match PyTorch's")


class ExportConfig(StrictModel):
    """Export ONNX, ORT-format (ORT Mobile) and ExecuTorch XNNPACK files, each verified against PyTorch."""

    formats: list[ExportFormat] = Field(default_factory=lambda: list(FORMAT_ORDER), min_length=1,
                                        description="onnx: .onnx; ort: .ort for ORT Mobile (made from the "
                                        ".onnx, so needs onnx); pte: ExecuTorch .pte lowered to XNNPACK")
    roles: list[Role] = Field(default_factory=lambda: ["teacher", "student"], min_length=1,
                              description="models exported; the benchmark compares teacher and student on "
                              "every runtime, so both are exported by default")
    opset: int = Field(18, ge=13, le=23, description="ONNX opset (the torch.export-based exporter targets 18+)")
    dynamic_batch: bool = Field(True, description="a dynamic batch axis; false exports a fixed batch of 1")
    simplify: bool = Field(True, description="simplify the ONNX graph with onnxslim (constant folding, fusions)")
    pte_max_batch: int = Field(256, ge=1, le=65_536,
                               description="largest batch the .pte accepts (ExecuTorch plans memory for it)")
    ort_target_platform: Literal["arm", "amd64"] = Field(
        "arm", description="optimisations baked into the .ort: arm keeps it portable to phones "
        "(no x86-only NCHWc layout); amd64 allows them")
    verify: VerifyConfig = Field(default_factory=VerifyConfig, description="parity tolerances")
    parallel: bool = Field(True, description="export the first role (the teacher) in a child process while this "
                           "one exports the others, on machines with more than one core (exporting is mostly "
                           "single-threaded); the files are the same either way")

    @field_validator("formats", "roles")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        repeated = sorted({v for v in value if value.count(v) > 1})
        if repeated:
            raise ValueError(f"listed more than once: {', '.join(repeated)}")
        return value

    @field_validator("formats")
    @classmethod
    def _ort_needs_onnx(cls, value: list[str]) -> list[str]:
        if "ort" in value and "onnx" not in value:
            raise ValueError("'ort' is converted from the ONNX export: add 'onnx' to formats")
        return value

    def ordered_formats(self) -> list[ExportFormat]:
        return [f for f in FORMAT_ORDER if f in self.formats]
