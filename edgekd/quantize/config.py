"""The ``quantize`` stage's recipe section.

The method is a typed union picked by ``kind`` (a bare string is shorthand for its defaults)::

    - quantize: {method: ort_static}                       # calibrated PTQ, the default grid
    - quantize:
        method: {kind: ort_static, calibration: {method: entropy, samples: 256}}
        max_accuracy_drop: 0.5        # accuracy-aware: keep the most sensitive nodes in float
        keep_if_faster: true          # speed-aware: ship INT8 only where measured faster
        speed: {threads: 1, batch_size: 32}
    - quantize: {method: ort_dynamic}                      # Linear/MatMul-heavy models
    - quantize: {method: {kind: executorch, samples: 256}} # PT2E + XNNPACK quantizer -> .pte
    - quantize: {method: {kind: qat, epochs: 3, temperature: 4, alpha: 0.7}}
    - quantize: {method: ort_static, also: [executorch]}  # INT8 .onnx and INT8 .pte, each kept where faster

Each method is one entry of ``QUANT_METHODS`` below; ``edgekd.quantize.methods.run_method`` dispatches
through it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import Field, field_validator, model_validator

from edgekd.config_base import StrictModel
from edgekd.registry import Registry
from edgekd.train.config import TrainConfig

CalibrationMethodName = Literal["minmax", "entropy", "percentile"]
QuantTypeName = Literal["quint8", "qint8"]
FormatName = Literal["qdq", "qoperator"]


class SampleConfig(StrictModel):
    """Real samples drawn from the training split (never random data: it cost 10-14 points on digits)."""

    samples: int = Field(256, ge=1, le=1_000_000, description="number of training samples to calibrate on")
    seed: int = Field(0, ge=0, description="which samples are drawn")
    batch_size: int = Field(32, ge=1, le=4096, description="samples per calibration batch")


class CalibrationConfig(SampleConfig):
    """How ONNX Runtime turns observed activations into INT8 ranges."""

    method: CalibrationMethodName = Field("minmax", description="minmax, entropy (KL) or percentile")
    percentile: float = Field(99.999, gt=90.0, le=100.0, description="kept share of |x| for 'percentile'")


class StaticCandidate(StrictModel):
    """One setting of ORT static quantization that the speed-aware search tries."""

    activation_type: QuantTypeName = Field("quint8", description="activation INT8 type; quint8 is fast on x86")
    format: FormatName = Field("qdq", description="QDQ (recommended) or QOperator (QLinearConv ...)")
    per_channel: bool = Field(True, description="one weight scale per output channel")
    reduce_range: bool = Field(False, description="7-bit weights: avoids u8s8 saturation on CPUs without VNNI")

    @property
    def label(self) -> str:
        act = "u8" if self.activation_type == "quint8" else "s8"
        parts = [f"{act}act", self.format, "perchannel" if self.per_channel else "pertensor"]
        return "-".join(parts + (["7bit"] if self.reduce_range else []))


def default_static_grid() -> list[StaticCandidate]:
    # Signed activations (ORT's own default) are kept in the grid on purpose: on x86 they ran
    # 1.2-2.1x slower than FP32 here, and the report should show that next to the winner.
    return [
        StaticCandidate(activation_type="quint8", format="qdq", per_channel=True),
        StaticCandidate(activation_type="quint8", format="qdq", per_channel=True, reduce_range=True),
        StaticCandidate(activation_type="qint8", format="qdq", per_channel=True),
        StaticCandidate(activation_type="quint8", format="qoperator", per_channel=True),
        StaticCandidate(activation_type="quint8", format="qdq", per_channel=False),
    ]


class OrtStaticMethod(StrictModel):
    """ONNX Runtime post-training static INT8, calibrated on real samples."""

    kind: Literal["ort_static"] = "ort_static"
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    candidates: list[StaticCandidate] = Field(default_factory=default_static_grid, min_length=1,
                                              description="settings timed against FP32; the fastest within "
                                                          "tolerance ships")


class DynamicCandidate(StrictModel):
    """One setting of ORT dynamic quantization (weights INT8 offline, activations at run time)."""

    weight_type: QuantTypeName = Field("qint8", description="INT8 type of the weights")
    per_channel: bool = Field(False, description="one weight scale per output channel")
    reduce_range: bool = Field(False, description="7-bit weights")

    @property
    def label(self) -> str:
        w = "u8" if self.weight_type == "quint8" else "s8"
        return f"dynamic-{w}w-{'perchannel' if self.per_channel else 'pertensor'}" + ("-7bit" if self.reduce_range
                                                                                      else "")


def default_dynamic_grid() -> list[DynamicCandidate]:
    return [DynamicCandidate(per_channel=False), DynamicCandidate(per_channel=True)]


class OrtDynamicMethod(StrictModel):
    """ONNX Runtime dynamic INT8: for Linear/MatMul-heavy models (8-16x slower than FP32 on conv nets here)."""

    kind: Literal["ort_dynamic"] = "ort_dynamic"
    candidates: list[DynamicCandidate] = Field(default_factory=default_dynamic_grid, min_length=1)


class ExecuTorchMethod(SampleConfig):
    """ExecuTorch 8-bit: PT2E with the XNNPACK quantizer, calibrated on real samples, lowered to ``.pte``."""

    kind: Literal["executorch"] = "executorch"
    per_channel: bool = Field(True, description="per-channel symmetric weights")


class QatMethod(TrainConfig):
    """Quantization-aware training with the teacher as distillation target, exported to QDQ ONNX.

    The training fields are the trainer's own (``TrainConfig``), with defaults for fine-tuning an
    already trained student: a few epochs at a small learning rate, no warm-up.
    """

    kind: Literal["qat"] = "qat"
    epochs: int = Field(3, ge=1, description="fake-quantized training epochs")
    lr: float = Field(0.005, gt=0.0, le=10.0, description="peak learning rate (small: the student is trained)")
    warmup_epochs: float = Field(0.0, ge=0.0, description="linear warm-up to lr, in epochs")
    weight_decay: float = Field(0.0, ge=0.0, lt=1.0, description="L2 weight decay")
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="KD softmax temperature")
    alpha: float = Field(0.7, ge=0.0, le=1.0, description="weight of the KD term; 1 - alpha goes to hard labels")
    per_channel: bool = Field(True, description="per-channel symmetric weights")
    reduce_range: bool | Literal["auto"] = Field(
        "auto", description="7-bit weights; 'auto' = on when the CPU lacks VNNI (u8 x s8 kernels saturate there)")
    calibration: SampleConfig = Field(default_factory=SampleConfig,
                                      description="real samples that initialise the observers before training")


@dataclass(frozen=True)
class QuantMethodEntry:
    """What edgekd knows about one quantization method without importing its libraries.

    ``config`` is the recipe's method section (``kind`` is ``Literal[name]`` and defaults to it), ``flow``
    the function that builds and searches its INT8 candidates, "package.module:function" taking
    ``(method, QuantizeJob)`` and returning a ``SearchOutcome`` (imported on first use). Adding a method
    is its config class, its flow and one entry in ``QUANT_METHODS``: the recipe's ``QuantMethod`` union,
    the ``method: NAME`` shorthand, its JSON Schema and validation errors, and ``run_method`` follow.
    """

    name: str
    config: type[StrictModel]
    flow: str
    #: the artifact format it ships ("onnx", "pte") and the runtime it measures candidates on
    fmt: str
    runtime: str
    #: a few words for docs and errors
    summary: str
    #: dotted key, under the method, of the number of real training samples it calibrates on (None: none)
    calibration_key: str | None = None
    #: it needs ExecuTorch's torch.export + XNNPACK quantizer (the ``mobile`` extra)
    needs_executorch: bool = False

    def __post_init__(self) -> None:
        kind = self.config.model_fields.get("kind")
        if kind is None or get_args(kind.annotation) != (self.name,) or kind.default != self.name:
            raise ValueError(f"quantization method {self.name!r}: {self.config.__name__}.kind must be "
                             f"Literal[{self.name!r}] = {self.name!r}")

    def run(self, method: StrictModel, job: Any) -> Any:
        """The method's flow on ``job`` (a ``QuantizeJob``): its ``SearchOutcome``."""
        module, _, function = self.flow.partition(":")
        return getattr(importlib.import_module(module), function)(method, job)

    def calibration_samples(self, method: StrictModel) -> tuple[str | None, int]:
        """(recipe key under ``quantize``, number) of training samples ``method`` calibrates on."""
        if self.calibration_key is None:
            return None, 0
        value: Any = method
        for part in self.calibration_key.split(".")[1:]:  # the key starts with "method"
            value = getattr(value, part)
        return self.calibration_key, int(value)


QUANT_METHODS: Registry[QuantMethodEntry] = Registry("quantization method", [
    QuantMethodEntry("ort_static", OrtStaticMethod, "edgekd.quantize.methods:run_ort_static", fmt="onnx",
                     runtime="onnxruntime", summary="ONNX Runtime static INT8, calibrated PTQ",
                     calibration_key="method.calibration.samples"),
    QuantMethodEntry("ort_dynamic", OrtDynamicMethod, "edgekd.quantize.methods:run_ort_dynamic", fmt="onnx",
                     runtime="onnxruntime", summary="ONNX Runtime dynamic INT8 (Linear/MatMul-heavy models)"),
    QuantMethodEntry("executorch", ExecuTorchMethod, "edgekd.quantize.methods:run_executorch", fmt="pte",
                     runtime="executorch", summary="ExecuTorch PT2E + XNNPACK 8-bit",
                     calibration_key="method.samples", needs_executorch=True),
    QuantMethodEntry("qat", QatMethod, "edgekd.quantize.methods:run_qat", fmt="onnx", runtime="onnxruntime",
                     summary="quantization-aware training with distillation, QDQ ONNX",
                     calibration_key="method.calibration.samples", needs_executorch=True),
])

#: the recipe's quantization method: the union of the registered method configs, picked by ``kind``
QuantMethod = Annotated[Union[tuple(entry.config for entry in QUANT_METHODS.values())],  # noqa: UP007
                        Field(discriminator="kind")]


class SpeedCheckConfig(StrictModel):
    """How INT8 is timed against FP32: side by side, interleaved, in one process, on the target runtime."""

    threads: int = Field(1, ge=1, le=256, description="intra-op threads of the runtime")
    batch_size: int = Field(32, ge=1, le=4096, description="samples per timed call")
    warmup: int = Field(3, ge=0, le=1000, description="untimed calls per model first")
    min_time_s: float = Field(1.0, gt=0.0, le=600.0, description="time each model at least this long")
    min_iters: int = Field(10, ge=1, le=100_000, description="and at least this many calls")
    min_speedup: float = Field(1.05, ge=1.0, le=100.0,
                               description="INT8 counts as faster only at this FP32/INT8 ratio or more "
                                           "(timing noise must not ship a no-gain INT8)")
    tie_tolerance: float = Field(0.03, ge=0.0, le=0.5,
                                 description="candidates within this fraction of the fastest count as equally "
                                             "fast; the most accurate of them ships")


class SensitivityConfig(StrictModel):
    """The accuracy-aware fallback: rank nodes by how much keeping them in float helps."""

    max_float_nodes: int = Field(8, ge=1, le=10_000, description="keep at most this many nodes in float")
    samples: int = Field(256, ge=1, le=100_000, description="validation samples the ranking is measured on")


class QuantizeConfig(StrictModel):
    method: QuantMethod = Field(default_factory=OrtStaticMethod, description="how to quantize (by 'kind')")
    also: list[QuantMethod] = Field(
        default_factory=list, max_length=len(QUANT_METHODS),
        description="more methods the same stage runs, each for another file format (e.g. [executorch]: the "
                    "XNNPACK INT8 .pte beside the ONNX INT8); each is timed against its own FP32 file on its own "
                    "runtime, under the same tolerance and speed rules, and ships student.int8.<format> only "
                    "where it wins")
    max_accuracy_drop: float | None = Field(
        0.5, ge=0.0, le=100.0,
        description="top-1 points INT8 may lose against FP32 on the target runtime; null = not checked")
    keep_if_faster: bool = Field(True, description="ship INT8 only where measured faster than FP32, else FP32")
    if_tolerance_unmet: Literal["keep_fp32", "ship_best", "error"] = Field(
        "keep_fp32", description="when no INT8 model meets max_accuracy_drop: ship FP32, ship the best INT8 "
                                 "found, or fail the stage")
    speed: SpeedCheckConfig = Field(default_factory=SpeedCheckConfig)
    sensitivity: SensitivityConfig = Field(default_factory=SensitivityConfig)
    eval_samples: int | None = Field(None, ge=1, description="validation samples for accuracy; null = all")

    @field_validator("method", mode="before")
    @classmethod
    def _method_shorthand(cls, value: Any) -> Any:
        # `method: ort_static` reads better in YAML than `method: {kind: ort_static}`
        return {"kind": value} if isinstance(value, str) else value

    @field_validator("also", mode="before")
    @classmethod
    def _also_shorthand(cls, value: Any) -> Any:
        if isinstance(value, (str, dict)):  # `also: executorch` for a list of one
            value = [value]
        return [{"kind": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _one_method_per_format(self) -> QuantizeConfig:
        # each method ships student.int8.<format>: two for one format would overwrite each other's file
        seen: dict[str, str] = {}
        for where, method in self.keyed_methods():
            fmt = QUANT_METHODS[method.kind].fmt
            if fmt in seen:
                # name what would work here: a method of a format not used yet, never the one that clashed
                used = set(seen) | {fmt}
                others = [k for k, e in QUANT_METHODS.items() if e.fmt not in used]
                fix = (f"list a method of another format under 'also' (e.g. also: [{others[0]}])" if others
                       else "every format already has its method")
                raise ValueError(f"{where} ({method.kind}) makes .{fmt} files like {seen[fmt]}: one method per "
                                 f"format; to use {method.kind} instead, set it as that one; else {fix}")
            seen[fmt] = f"{where} ({method.kind})"
        return self

    def keyed_methods(self) -> list[tuple[str, Any]]:
        """(recipe key under ``quantize``, method) of every method the stage runs: ``method`` first, then
        ``also.0``, ``also.1``, ..."""
        return [("method", self.method), *((f"also.{i}", m) for i, m in enumerate(self.also))]
