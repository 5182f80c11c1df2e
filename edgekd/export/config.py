"""The ``export`` stage's recipe section::

    - export: {formats: [onnx, ort, pte], opset: 18, verify: {samples: 256, atol: 1.0e-3, rtol: 1.0e-2}}

Every artifact is checked against the PyTorch model on real validation samples, and at the
batch sizes it will be run at, before it is handed over; ``verify`` holds the tolerances. The
tolerance names are those of earlier recipes (``atol``, ``min_top1_agreement``); ``rtol`` and
``batch_sizes`` are new, with defaults.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from edgekd.config_base import StrictModel
from edgekd.export.formats import EXPORT_FORMATS, FORMAT_ORDER

#: the names of ``EXPORT_FORMATS``, for pydantic (errors list them; the JSON Schema gets an enum)
ExportFormat = EXPORT_FORMATS.literal()
Role = Literal["teacher", "student"]

#: largest per-sample logit difference allowed, as a fraction of the sample's largest |logit|
DEFAULT_RTOL = 1e-2



class VerifyConfig(StrictModel):
    """Parity of an exported artifact with the PyTorch model, on real validation samples.

    A sample passes when its largest logit difference is at most ``atol + rtol * its largest
    |logit|`` (float rounding grows with the logits' size; see ``edgekd.export.parity``).
    """

    samples: int = Field(256, ge=1, le=100_000,
                         description="validation samples run through every artifact (fewer if the split is smaller)")
    atol: float = Field(1e-3, gt=0.0, le=100.0,
                        description="absolute part of the allowed logit difference (what float rounding gives "
                        "on small logits)")
    rtol: float = Field(DEFAULT_RTOL, ge=0.0, le=1.0,
                        description="relative part of the allowed logit difference: a fraction of each sample's "
                        "largest |logit| (0: absolute only)")
    min_top1_agreement: float = Field(0.99, ge=0.0, le=1.0,
                                      description="fraction of samples whose top-1 class must match PyTorch's")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 3], min_length=0,
                                   description="batch sizes each artifact is also run at in one call, besides the "
                                   "benchmark's (batch 1 is what a phone runs; an odd batch catches splits that "
                                   "assume an even one); larger than a .pte's pte_max_batch is skipped")

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(b < 1 for b in value):
            raise ValueError("batch sizes must be at least 1")
        return sorted(set(value))


class ExportConfig(StrictModel):
    """Export ONNX, ORT-format (ORT Mobile) and ExecuTorch XNNPACK files, each verified against PyTorch."""

    formats: list[ExportFormat] = Field(default_factory=lambda: list(FORMAT_ORDER), min_length=1,
                                        description="; ".join(f"{e.name}: {e.summary}" for e in EXPORT_FORMATS.values()))
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
    codebook: bool = Field(True, description="beside a .onnx whose weights are shared (the cluster stage), write "
                           "<role>.codebook.onnx: each float weight of at most 256 distinct values stored as a uint8 "
                           "index and a codebook (about 4x smaller on disk; ONNX Runtime folds it back to float "
                           "weights when it loads the file). Nothing is written for a model without shared weights")
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
    def _sources_listed(cls, value: list[str]) -> list[str]:
        for fmt in value:
            source = EXPORT_FORMATS[fmt].source
            if source is not None and source not in value:
                raise ValueError(f"'{fmt}' is converted from the {source.upper()} export: add '{source}' to formats")
        return value

    def ordered_formats(self) -> list[ExportFormat]:
        return [f for f in FORMAT_ORDER if f in self.formats]

    def declared_max_batch(self, fmt: str) -> int | None:
        """The largest batch a ``fmt`` file is exported to take (None: any)."""
        if not self.dynamic_batch:
            return 1
        return self.pte_max_batch if fmt == "pte" else None
