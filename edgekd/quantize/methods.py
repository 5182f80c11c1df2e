"""One flow per quantization method; ``QUANT_METHODS`` (quantize/config.py) names each method's flow.

Each flow builds its INT8 candidates, then hands them to ``run_search`` (measure accuracy on the
target runtime, time side by side against FP32, repair accuracy, choose). Flows work on a
``QuantizeJob`` rather than the pipeline's ``RunContext`` so they can run on any model and data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgekd.data.bundle import DataBundle
from edgekd.quantize.calibration import calibration_samples
from edgekd.quantize.candidates import Bench, Candidate, CandidateBuild, Policy, SearchOutcome, run_search
from edgekd.quantize.config import (
    QUANT_METHODS,
    ExecuTorchMethod,
    OrtDynamicMethod,
    OrtStaticMethod,
    QatMethod,
    QuantizeConfig,
    QuantMethod,
    StaticCandidate,
)


@dataclass
class QuantizeJob:
    """Everything a method needs: the config, the data, the models and where to write.

    ``fp32_onnx`` / ``fp32_pte`` return the FP32 student file for that format, made on first use
    (the stage reuses the export stage's artifact when there is one).
    """

    config: QuantizeConfig
    data: DataBundle
    student: nn.Module
    teacher: nn.Module | None
    workdir: Path
    fp32_onnx: Callable[[], Path]
    fp32_pte: Callable[[], Path]
    device: torch.device = torch.device("cpu")
    seed: int = 0
    #: continue an interrupted QAT training from its last epoch checkpoint
    resume: bool = False

    @property
    def policy(self) -> Policy:
        c = self.config
        return Policy(max_accuracy_drop=c.max_accuracy_drop, keep_if_faster=c.keep_if_faster,
                      min_speedup=c.speed.min_speedup, if_tolerance_unmet=c.if_tolerance_unmet,
                      tie_tolerance=c.speed.tie_tolerance)

    def bench(self, runtime: str) -> Bench:
        s = self.config.speed
        x, y = self.data.val_tensors(self.config.eval_samples)
        return Bench(runtime=runtime, threads=s.threads, batch_size=s.batch_size, x_val=x, y_val=y,
                     warmup=s.warmup, min_time_s=s.min_time_s, min_iters=s.min_iters)


def _unique(settings: list) -> list:
    seen, out = set(), []
    for item in settings:
        if item.label not in seen:
            seen.add(item.label)
            out.append(item)
    return out


def pte_max_batch(job: QuantizeJob) -> int:
    """The largest batch the stage feeds a ``.pte`` (ExecuTorch plans memory for the bound)."""
    from edgekd.quantize.candidates import EVAL_BATCH

    return max(EVAL_BATCH, job.config.speed.batch_size)


def _vnni_text() -> str:
    from edgekd.quantize.ort_static import cpu_has_vnni

    return {True: "yes", False: "no (u8 x s8 kernels can saturate: 7-bit or per-tensor weights are safer)",
            None: "unknown"}[cpu_has_vnni()]


def _keep_sensitive_in_float(job: QuantizeJob, target: Candidate, prepared: Path, fp32: Candidate, bench: Bench,
                             requantize):
    """The accuracy-aware fallback (``sensitivity``) with the job's settings."""
    from edgekd.quantize.graph import weighted_nodes
    from edgekd.quantize.sensitivity import keep_sensitive_in_float

    s = job.config.sensitivity
    return keep_sensitive_in_float(target, weighted_nodes(prepared), requantize, bench, fp32, fp32.path,
                                   max_drop=job.config.max_accuracy_drop, max_float_nodes=s.max_float_nodes,
                                   samples=s.samples, workdir=job.workdir / "sensitivity")


def _bench(job: QuantizeJob, method: QuantMethod) -> Bench:
    """The job's bench on the runtime the method's registry entry measures on."""
    return job.bench(QUANT_METHODS[method.kind].runtime)


def _search(job: QuantizeJob, method: QuantMethod, bench: Bench, fp32: Candidate, builds: list[CandidateBuild],
            **kw) -> SearchOutcome:
    """``run_search`` with the job's policy, in the format the method's registry entry ships."""
    return run_search(bench, job.policy, fp32, builds, fmt=QUANT_METHODS[method.kind].fmt, **kw)


def run_ort_static(method: OrtStaticMethod, job: QuantizeJob) -> SearchOutcome:
    from edgekd.quantize.ort_static import calibrate, preprocess, quantize_candidate

    cal = method.calibration
    samples = calibration_samples(job.data, cal.samples, cal.seed, key="method.calibration.samples")
    fp32_path = job.fp32_onnx()
    prepared = preprocess(fp32_path, job.workdir / "student.fp32.prep.onnx")
    cache = calibrate(prepared, samples, cal, job.workdir / f"calibration.{cal.method}.json")
    bench = _bench(job, method)
    fp32 = Candidate(name="fp32", precision="fp32", path=fp32_path)

    def quantize(setting: StaticCandidate, out: Path, exclude: list[str]) -> Path:
        return quantize_candidate(prepared, out, setting, cache_path=cache, calibration=cal.method,
                                  nodes_to_exclude=exclude)

    builds = [CandidateBuild(c.label, c.model_dump(), lambda c=c: quantize(c, job.workdir / f"{c.label}.onnx", []))
              for c in _unique(method.candidates)]

    def fallback(target: Candidate):
        setting = StaticCandidate(**target.settings)
        return _keep_sensitive_in_float(job, target, prepared, fp32, bench,
                                        lambda exclude, out: quantize(setting, out, exclude))

    notes = [f"static INT8 calibrated with {cal.method} on {cal.samples} real training samples (seed {cal.seed})",
             f"CPU VNNI: {_vnni_text()}"]
    return _search(job, method, bench, fp32, builds, fallback=fallback, notes=notes)


def run_ort_dynamic(method: OrtDynamicMethod, job: QuantizeJob) -> SearchOutcome:
    from edgekd.quantize.config import DynamicCandidate
    from edgekd.quantize.ort_dynamic import quantize_dynamic_candidate
    from edgekd.quantize.ort_static import preprocess

    fp32_path = job.fp32_onnx()
    prepared = preprocess(fp32_path, job.workdir / "student.fp32.prep.onnx")
    bench = _bench(job, method)
    fp32 = Candidate(name="fp32", precision="fp32", path=fp32_path)
    builds = [CandidateBuild(c.label, c.model_dump(),
                             lambda c=c: quantize_dynamic_candidate(prepared, job.workdir / f"{c.label}.onnx", c))
              for c in _unique(method.candidates)]

    def fallback(target: Candidate):
        setting = DynamicCandidate(**target.settings)
        return _keep_sensitive_in_float(
            job, target, prepared, fp32, bench,
            lambda exclude, out: quantize_dynamic_candidate(prepared, out, setting, nodes_to_exclude=exclude))

    return _search(job, method, bench, fp32, builds, fallback=fallback,
                      notes=["dynamic INT8: weights quantized offline, activations at run time (no calibration)"])


def run_executorch(method: ExecuTorchMethod, job: QuantizeJob) -> SearchOutcome:
    from edgekd.quantize.executorch_quant import lower_to_pte, quantize_pt2e, require_executorch

    require_executorch()
    samples = calibration_samples(job.data, method.samples, method.seed, key="method.samples")
    example = job.data.example_batch(2)
    student = job.student.cpu().eval()
    fp32 = Candidate(name="fp32", precision="fp32", path=job.fp32_pte())
    label = f"xnnpack-8bit-{'perchannel' if method.per_channel else 'pertensor'}"
    max_batch = pte_max_batch(job)

    def build() -> Path:
        quantized = quantize_pt2e(student, samples, per_channel=method.per_channel, batch_size=method.batch_size,
                                  max_batch=max_batch)
        return lower_to_pte(quantized, example, job.workdir / f"{label}.pte", max_batch)

    builds = [CandidateBuild(label, {"per_channel": method.per_channel, "samples": method.samples}, build)]
    notes = [f"PT2E + XNNPACKQuantizer calibrated on {method.samples} real training samples, lowered to XNNPACK",
             "accuracy-aware node exclusion applies to ONNX methods; for ExecuTorch the tolerance decides "
             "between INT8 and FP32"]
    return _search(job, method, _bench(job, method), fp32, builds, notes=notes)


def run_qat(method: QatMethod, job: QuantizeJob) -> SearchOutcome:
    from edgekd.quantize.qat import qat_build

    fp32 = Candidate(name="fp32", precision="fp32", path=job.fp32_onnx())
    label = f"qat-kd-{'perchannel' if method.per_channel else 'pertensor'}"
    build = CandidateBuild(label, method.model_dump(exclude={"kind"}),
                           lambda: qat_build(method, job, job.workdir / f"{label}.onnx"))
    notes = [f"QAT with distillation from the teacher: {method.epochs} epoch(s), T={method.temperature:g}, "
             f"alpha={method.alpha:g}; exported as QDQ ONNX with unsigned activations",
             "the PyTorch student is left unchanged: QAT's weights live in the shipped INT8 model only"]
    return _search(job, method, _bench(job, method), fp32, [build], notes=notes)


def run_method(job: QuantizeJob, method: QuantMethod | None = None) -> SearchOutcome:
    """Run ``method`` (default ``job.config.method``; the stage passes each of ``also`` too) through its
    registry entry's flow (``QUANT_METHODS[method.kind]``)."""
    method = job.config.method if method is None else method
    return QUANT_METHODS[method.kind].run(method, job)


def standalone_job(config: QuantizeConfig, data: DataBundle, student: nn.Module, workdir: Path, *,
                   teacher: nn.Module | None = None, seed: int = 0) -> QuantizeJob:
    """A job outside a pipeline run (tools, tests): FP32 files are exported into ``workdir`` on first use."""
    from edgekd.export.onnx_export import export_onnx
    from edgekd.quantize.executorch_quant import lower_to_pte

    workdir.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}  # exported once per job, never reused from an earlier job's files

    def fp32_onnx() -> Path:
        if "onnx" not in made:
            export_onnx(student, data.example_batch(2), workdir / "student.fp32.onnx")
            made["onnx"] = workdir / "student.fp32.onnx"
        return made["onnx"]

    def fp32_pte() -> Path:
        if "pte" not in made:
            lower_to_pte(student.cpu().eval(), data.example_batch(2), workdir / "student.fp32.pte", pte_max_batch(job))
            made["pte"] = workdir / "student.fp32.pte"
        return made["pte"]

    job = QuantizeJob(config=config, data=data, student=student, teacher=teacher, workdir=workdir,
                      fp32_onnx=fp32_onnx, fp32_pte=fp32_pte, seed=seed)
    return job
