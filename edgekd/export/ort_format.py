"""ORT format (``.ort``) for ORT Mobile, made by onnxruntime's own converter, plus its usability check.

The converter optimises the graph once (``Fixed`` style: the optimised graph is saved, so a
minimal mobile build need not optimise at load time) and writes the flatbuffer ``.ort`` and a
``required_operators.config`` listing the kernels a reduced-size ORT Mobile build must keep;
both are kept next to the ``.ort``.

The mobile usability checker (``onnxruntime.tools.check_onnx_model_mobile_usability``) says
whether the model should run well on the phone accelerators' execution providers (NNAPI on
Android, CoreML on iOS) or is best left on the CPU provider. We call the same functions it
calls and keep the per-provider verdicts as data instead of log lines.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from edgekd.errors import StageError
from edgekd.export.prepare import one_line


@contextlib.contextmanager
def root_logging_untouched():
    """Undo what onnxruntime.tools does to the root logger: its ``get_logger`` calls
    ``logging.basicConfig``, which would add a stderr handler to the host application's logging
    (every later warning from any library printed in ORT's format)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def required_operators(config_file: Path) -> list[str]:
    """``domain;opset;Op1,Op2`` lines of a required-operators config as ``domain:opset:Op`` entries."""
    ops: list[str] = []
    for line in config_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        domain, opset, names = (line.split(";") + ["", ""])[:3]
        ops += [f"{domain}:{opset}:{name}" for name in names.split(",") if name]
    return ops


def convert_to_ort(onnx_path: Path, ort_path: Path, *, target_platform: str = "arm") -> dict[str, Any]:
    """Convert ``onnx_path`` to ``ort_path`` with onnxruntime's converter; return facts about it."""
    with root_logging_untouched():
        return _convert(Path(onnx_path), Path(ort_path), target_platform)


def _convert(onnx_path: Path, ort_path: Path, target_platform: str) -> dict[str, Any]:
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    # its config writer logs at INFO on a logger it sets to DEBUG; keep only its warnings
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    ort_path.parent.mkdir(parents=True, exist_ok=True)
    config_path = ort_path.with_suffix(".required_operators.config")
    # Convert in a private folder next to the target, then rename: a crash never leaves a
    # half-written .ort under its final name, and the rename stays on one file system.
    with tempfile.TemporaryDirectory(dir=ort_path.parent, prefix=f".{ort_path.stem}.") as tmp:
        work = Path(tmp)
        source = work / f"{ort_path.stem}.onnx"
        # the converter names its output after its input, so the input gets the target's stem
        source.write_bytes(onnx_path.read_bytes())
        try:
            # the converter prints progress on stdout; the CLI's stdout is for results
            with contextlib.redirect_stdout(io.StringIO()):
                convert_onnx_models_to_ort(source, output_dir=work / "out",
                                           optimization_styles=[OptimizationStyle.Fixed],
                                           target_platform=target_platform)
        except Exception as exc:  # onnxruntime raises its pybind error types on a bad model
            raise StageError(f"onnxruntime could not convert {onnx_path.name} to ORT format: {one_line(exc)}",
                             hint="check that onnxruntime runs the .onnx file (edgekd's onnxruntime runtime)") from exc
        produced = work / "out" / f"{ort_path.stem}.ort"
        configs = sorted((work / "out").glob("*.config"))
        if not produced.is_file():
            raise StageError(f"onnxruntime's converter wrote no {produced.name} for {onnx_path.name}")
        operators = required_operators(configs[0]) if configs else []
        if configs:
            # the header names the temporary .ort it was made from: name the delivered file instead
            text = configs[0].read_text().replace(str(produced), ort_path.name)
            configs[0].write_text(text)
            os.replace(configs[0], config_path)
        os.replace(produced, ort_path)
    return {
        "converter": "onnxruntime.tools.convert_onnx_models_to_ort",
        "optimization_style": "Fixed",
        "target_platform": target_platform,
        "file_bytes": ort_path.stat().st_size,
        "required_operators_config": config_path.name if config_path.is_file() else None,
        "required_operators": operators,
    }


def mobile_usability(onnx_path: Path) -> dict[str, Any]:
    """ORT's mobile usability verdict for NNAPI and CoreML, per execution provider.

    ``as_is``/``with_fixed_shapes`` are ORT's ``YES``/``MAYBE``/``NO`` (would the provider take
    enough of the graph in few enough partitions to be worth trying). ``recommendation`` is
    ORT's own conclusion: ``cpu`` when no provider is worth trying.
    """
    with root_logging_untouched():
        return _mobile_usability(onnx_path)


def _mobile_usability(onnx_path: Path) -> dict[str, Any]:
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    checkers = {
        "nnapi": uc.check_nnapi_partitions,
        "coreml_neuralnetwork": lambda m, fixed: uc.check_coreml_partitions(
            m, fixed, "coreml_supported_neuralnetwork_ops.md"),
        "coreml_mlprogram": lambda m, fixed: uc.check_coreml_partitions(m, fixed, "coreml_supported_mlprogram_ops.md"),
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # as the checker does: analyse the graph after ORT's basic optimisations
            basic = Path(tmp) / "basic.onnx"
            optimize_model(Path(onnx_path), basic, use_external_initializers=True)
            model = ModelProtoWithShapeInfo(basic).model_with_shape_info
            dynamic_inputs, _ = uc.check_shapes(model.graph)
            verdicts: dict[str, Any] = {}
            for ep, check in checkers.items():
                info = check(model, True)
                as_is = info.suitability()
                fixed = check(model, False).suitability() if as_is != info.TryWithEP.YES and dynamic_inputs else None
                verdicts[ep] = {
                    "as_is": as_is.name,
                    "with_fixed_shapes": fixed.name if fixed is not None else None,
                    "supported_nodes": info.num_supported_nodes,
                    "nodes": info.num_nodes,
                    "partitions": info.num_partitions,
                    "unsupported_ops": sorted(info.unsupported_ops),
                }
    except Exception as exc:  # the checker is advisory: report why it could not run instead of failing
        return {"checked": False, "error": one_line(exc)}
    as_is = [ep for ep, v in verdicts.items() if v["as_is"] != "NO"]
    if_fixed = [ep for ep, v in verdicts.items() if v["as_is"] == "NO" and v["with_fixed_shapes"] not in (None, "NO")]
    advice = []
    if as_is:
        advice.append(f"compare {', '.join(as_is)} with the CPU EP on the device")
    if if_fixed:
        advice.append(f"with fixed input shapes (onnxruntime.tools.make_dynamic_shape_fixed) try {', '.join(if_fixed)}")
    return {
        "checked": True,
        "dynamic_inputs": bool(dynamic_inputs),
        "execution_providers": verdicts,
        "recommendation": "; ".join(advice) if advice else "use the CPU EP",
    }
