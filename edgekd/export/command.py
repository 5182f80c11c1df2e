"""``edgekd export MODEL --to onnx|ort|pte``: export one portable checkpoint outside a recipe.

The file is verified like the stage's artifacts. Without a dataset at hand the check runs on
seeded standard-normal inputs of the checkpoint's input shape (edgekd's data are normalised to
zero mean and unit variance, so these are in range); pass ``inputs`` to check on real samples.
The facts (exporter, size, parity numbers) are written next to the artifact as ``<file>.json``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from edgekd.errors import ConfigError, EdgekdError, StageError
from edgekd.export.config import DEFAULT_RTOL, FORMAT_ORDER, ExportConfig, VerifyConfig
from edgekd.export.executorch_export import export_pte
from edgekd.export.onnx_export import export_onnx
from edgekd.export.ort_format import convert_to_ort, mobile_usability
from edgekd.export.parity import check_parity
from edgekd.fileio import atomic_write_json
from edgekd.runtimes.registry import runtime_for_format


def _verify(model: torch.nn.Module, path: Path, fmt: str, inputs: torch.Tensor,
            cfg: ExportConfig) -> dict[str, Any]:
    verify = cfg.verify
    loaded = runtime_for_format(fmt).load(path, threads=1)
    try:
        return check_parity(model, loaded, inputs, atol=verify.atol, rtol=verify.rtol,
                            min_top1_agreement=verify.min_top1_agreement, batch_sizes=verify.batch_sizes,
                            declared_max_batch=cfg.declared_max_batch(fmt), label=f"{path.name}")
    finally:
        del loaded


def export_model(model_path: Path, to: str, out: Path | None = None, *, opset: int = 18,
                 dynamic_batch: bool = True, simplify: bool = True, pte_max_batch: int = 256,
                 ort_target_platform: str = "arm", verify_samples: int = 64, atol: float = 1e-3,
                 rtol: float = DEFAULT_RTOL, min_top1_agreement: float = 0.99, inputs: torch.Tensor | None = None,
                 factories: Iterable[str] = ()) -> Path:
    """Export a portable ``.pt`` checkpoint to ``to`` ("onnx", "ort" or "pte"); return the file written.

    ``out`` defaults to the checkpoint's path with the format's suffix, and then an existing file there is
    not replaced (``ConfigError``: a run's artifacts sit beside its checkpoint). ``--to ort`` also writes
    the ``.onnx`` it is converted from (next to ``out``). Raises ``ParityError`` when the file
    disagrees with PyTorch beyond the tolerances. ``factories``: user factories the checkpoint may
    name (any other raises ``ModelError``: a file never chooses code to run).
    """
    from edgekd.models.portable import load_portable

    if to not in FORMAT_ORDER:
        raise ConfigError(f"cannot export to {to!r}", hint=f"choose one of: {', '.join(FORMAT_ORDER)}")
    try:  # the same validation as a recipe's export section
        cfg = ExportConfig(formats=["onnx", to] if to == "ort" else [to], opset=opset, dynamic_batch=dynamic_batch,
                           simplify=simplify, pte_max_batch=pte_max_batch, ort_target_platform=ort_target_platform,
                           verify=VerifyConfig(samples=verify_samples, atol=atol, rtol=rtol,
                                               min_top1_agreement=min_top1_agreement))
    except ValueError as exc:
        raise ConfigError(f"bad export option: {exc}") from exc
    model_path = Path(model_path)
    model, meta = load_portable(model_path, factories=factories)
    input_shape = tuple(int(s) for s in meta["input_shape"])
    if inputs is None:
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn((cfg.verify.samples, *input_shape), generator=generator)
        inputs_note = "seeded standard-normal inputs (no dataset given)"
    else:
        inputs = inputs[: cfg.verify.samples]
        inputs_note = "given inputs"
        if tuple(inputs.shape[1:]) != input_shape:
            raise ConfigError(f"inputs are shaped {tuple(inputs.shape[1:])} per sample but {model_path.name} "
                              f"takes {input_shape}")
    target = Path(out) if out is not None else model_path.with_suffix(f".{to}")
    if out is None:
        # beside a run's student.pt sit the run's own artifacts, which its report describes: never replace a
        # file the user did not name
        written = [target, target.with_suffix(".onnx")] if to == "ort" else [target]
        clash = [p for p in written if p.exists()]
        if clash:
            raise ConfigError(f"{clash[0]} exists; without --out edgekd export writes beside the checkpoint and does "
                              "not replace a file it was not told to",
                              hint=f"give --out NEW_PATH, or --out {clash[0]} to replace it")
    example = inputs[:2]
    info: dict[str, Any]
    if to == "pte":
        info = export_pte(model, example, target, dynamic_batch=cfg.dynamic_batch, max_batch=cfg.pte_max_batch)
    else:
        onnx_path = target if to == "onnx" else target.with_suffix(".onnx")
        info = export_onnx(model, example, onnx_path, opset=cfg.opset, dynamic_batch=cfg.dynamic_batch,
                           simplify=cfg.simplify)
        if to == "ort":
            onnx_info = dict(info, parity=_verify(model, onnx_path, "onnx", inputs, cfg))
            atomic_write_json(onnx_path.with_name(onnx_path.name + ".json"), onnx_info)
            info = convert_to_ort(onnx_path, target, target_platform=cfg.ort_target_platform)
            info["mobile_usability"] = mobile_usability(onnx_path)
    try:
        info["parity"] = _verify(model, target, to, inputs, cfg)
    except EdgekdError as exc:
        atomic_write_json(target.with_name(target.name + ".json"),
                          dict(info, status="failed", error=exc.message, parity_inputs=inputs_note,
                               parity={"passed": False, "outputs": getattr(exc, "outputs", [])}))
        raise
    info.update(status="ok", source=str(model_path), parity_inputs=inputs_note)
    atomic_write_json(target.with_name(target.name + ".json"), info)
    if not target.is_file():
        raise StageError(f"the {to} export wrote no file at {target}")
    return target
