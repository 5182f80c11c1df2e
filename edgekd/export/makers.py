"""How each export format is made from one role's model: ``ExportJob`` (what to export, where) and one
maker per format, named by its ``edgekd.export.formats`` entry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekd.export.codebook import CODEBOOK_SUFFIX, write_codebook_onnx
from edgekd.export.config import ExportConfig
from edgekd.export.executorch_export import export_pte
from edgekd.export.formats import EXPORT_FORMATS
from edgekd.export.onnx_export import export_onnx
from edgekd.export.ort_format import convert_to_ort, mobile_usability


@dataclass
class ExportJob:
    """One role's model (CPU, eval mode), where its files go, and the batch sizes each file must run."""

    role: str
    model: nn.Module
    example: torch.Tensor
    out_dir: Path
    config: ExportConfig
    #: single-call batch sizes checked besides the parity batches (verify's and the benchmark's)
    batch_sizes: tuple[int, ...] = ()
    #: a file that failed for its format is moved here (None: deleted), so artifacts/ holds no dead file
    failed_dir: Path | None = None

    def path(self, fmt: str) -> Path:
        return self.out_dir / f"{self.role}{EXPORT_FORMATS[fmt].suffix}"


def make_onnx(job: ExportJob) -> dict[str, Any]:
    cfg = job.config
    info = export_onnx(job.model, job.example, job.path("onnx"), opset=cfg.opset,
                       dynamic_batch=cfg.dynamic_batch, simplify=cfg.simplify)
    if cfg.codebook:
        try:
            shared = write_codebook_onnx(job.path("onnx"), job.out_dir / f"{job.role}{CODEBOOK_SUFFIX}")
        except ValueError as exc:  # the .onnx itself is fine: ship it without the smaller twin, and say why
            info["codebook_error"] = str(exc)
        else:
            info.update(shared or {})
    return info


def make_ort(job: ExportJob) -> dict[str, Any]:
    source = job.path("onnx")  # ExportConfig guarantees onnx is made first
    info = convert_to_ort(source, job.path("ort"), target_platform=job.config.ort_target_platform)
    info["source"] = source.name
    info["mobile_usability"] = mobile_usability(source)
    return info


def make_pte(job: ExportJob) -> dict[str, Any]:
    return export_pte(job.model, job.example, job.path("pte"), dynamic_batch=job.config.dynamic_batch,
                      max_batch=job.config.pte_max_batch)

