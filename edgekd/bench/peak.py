"""How close a model runs to the machine's limit: FP32 and INT8 GEMM micro-benchmarks.

A square FP32 matrix product is about the fastest dense work a CPU does, so its GFLOP/s at a thread
count is a practical ceiling ("achievable peak", not the datasheet's theoretical one). Two libraries
are timed and the faster kept: PyTorch's ``torch.mm`` (MKL / oneDNN / OpenBLAS, whichever it was
built with) and ONNX Runtime's ``MatMul`` (MLAS). Neither is always the faster: on a 2-core AMD EPYC
(AVX2) ORT's MatMul ran 106-108 GFLOP/s at 1 thread against 77-90 for torch.mm, and ONNX Runtime
models then read 103-106% of a torch-only ceiling. A model's achieved
rate is ``2 * MACs * batch / latency``; its share of the ceiling says whether there is speed
left to win (a small share at batch 1 is usual: overheads, memory traffic, small layers).
INT8 models do integer operations, so their rate is GOP/s and is compared with an INT8 ceiling:
a u8 x s8 ``MatMulInteger`` through ONNX Runtime's CPU provider (MLAS picks its VNNI / AMX kernels
where the CPU has them, as it does for the quantized models). On this project's 2-core Xeon with
AMX it measured about 1,650 GOP/s at 1 thread against about 160 GFLOP/s for FP32 ``torch.mm``:
dividing INT8 work by the FP32 ceiling read 150-175% "of peak".
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from edgekd.bench.latency import measure


class GemmPeak(BaseModel):
    """The best GEMM rate of one precision measured at one thread count."""

    threads: int
    gflops: float = Field(..., description="best 2*n^3 / fastest call over the sizes tried, in GFLOP/s "
                                           "(GOP/s for int8)")
    size: int = Field(..., description="n of the n x n @ n x n product that reached it")
    by_size: dict[str, float] = Field(default_factory=dict, description="GFLOP/s for each size tried")
    backend: str = "torch.mm float32"
    #: benchmark.json files from before the INT8 probe hold FP32 peaks only, without this field
    precision: Literal["fp32", "int8"] = "fp32"


def gemm_peak(threads: int, *, sizes: tuple[int, ...] = (256, 512, 1024), min_time_s: float = 0.1,
              min_iters: int = 5) -> GemmPeak:
    """Time ``torch.mm`` on n x n FP32 matrices at ``threads`` threads; keep the fastest size.

    The fastest call is what counts, so a short ``min_time_s`` (with ``min_iters`` calls) suffices.
    """
    import torch

    if threads < 1:
        raise ValueError("threads must be at least 1")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        rates: dict[str, float] = {}
        for n in sizes:
            a = torch.randn(n, n, generator=generator)
            b = torch.randn(n, n, generator=generator)
            out = torch.empty(n, n)
            stats = measure(lambda a=a, b=b, out=out: torch.mm(a, b, out=out), warmup=2, min_time_s=min_time_s,
                            min_iters=min_iters)
            # the fastest call: a ceiling is what the machine *can* do, not its typical moment under load
            rates[str(n)] = 2.0 * n**3 / (stats.min_ms / 1e3) / 1e9
    finally:
        torch.set_num_threads(previous)
    best = max(rates, key=rates.__getitem__)
    return GemmPeak(threads=threads, gflops=rates[best], size=int(best), by_size=rates)


def _matmul_integer_model(n: int) -> bytes:
    """A one-node ONNX graph: ``Y = MatMulInteger(A u8 [n, n], B s8 [n, n] constant, zero point 128)``.

    B is an initializer, as a quantized model's weights are, so ONNX Runtime may pre-pack it."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "B")
    zero_point = numpy_helper.from_array(np.array(128, dtype=np.uint8), "A_zero_point")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B", "A_zero_point"], ["Y"])], "int8_gemm",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])], [weights, zero_point])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every ONNX Runtime this project supports
    return model.SerializeToString()


def _ort_rates(make_model, make_feed, threads: int, sizes: tuple[int, ...], min_time_s: float,
               min_iters: int) -> dict[str, float]:
    """GOP/s per size of a one-node ONNX graph ``make_model(n)`` fed ``make_feed(n)`` on ONNX Runtime's CPU
    provider at ``threads`` intra-op threads (the fastest call per size)."""
    import onnxruntime as ort

    rates: dict[str, float] = {}
    for n in sizes:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(make_model(n), options, providers=["CPUExecutionProvider"])
        feed = make_feed(n)
        stats = measure(lambda s=session, f=feed: s.run(None, f), warmup=2, min_time_s=min_time_s,
                        min_iters=min_iters)
        rates[str(n)] = 2.0 * n**3 / (stats.min_ms / 1e3) / 1e9
    return rates


def _matmul_float_model(n: int) -> bytes:
    """A one-node ONNX graph: ``Y = MatMul(A f32 [n, n], B f32 [n, n] constant)``."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["Y"])], "fp32_gemm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, n])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def fp32_gemm_peak(threads: int, *, sizes: tuple[int, ...] = (256, 512, 1024), min_time_s: float = 0.1,
                   min_iters: int = 5) -> GemmPeak:
    """The FP32 ceiling: ``gemm_peak`` (torch.mm) and ONNX Runtime's ``MatMul`` at ``threads``, the faster per
    size; ``backend`` names the library that set the best rate. torch.mm alone without onnxruntime."""
    import numpy as np

    torch_peak = gemm_peak(threads, sizes=sizes, min_time_s=min_time_s, min_iters=min_iters)
    try:
        import onnxruntime as ort

        ort_rates = _ort_rates(_matmul_float_model,
                               lambda n: {"A": np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)},
                               threads, sizes, min_time_s, min_iters)
    except ImportError:
        return torch_peak
    rates = {n: max(torch_peak.by_size[n], ort_rates[n]) for n in torch_peak.by_size}
    best = max(rates, key=rates.__getitem__)
    backend = (torch_peak.backend if torch_peak.by_size[best] >= ort_rates[best]
               else f"onnxruntime {ort.__version__} MatMul float32 (CPU provider)")
    return GemmPeak(threads=threads, gflops=rates[best], size=int(best), by_size=rates,
                    backend=f"{backend}; the faster of torch.mm and onnxruntime MatMul")


def int8_gemm_peak(threads: int, *, sizes: tuple[int, ...] = (256, 512, 1024), min_time_s: float = 0.1,
                   min_iters: int = 5) -> GemmPeak:
    """Time a u8 x s8 ``MatMulInteger`` (int32 out) on n x n matrices through ONNX Runtime's CPU provider at
    ``threads`` intra-op threads; keep the fastest size. Raises ``ImportError`` without onnxruntime."""
    import numpy as np
    import onnxruntime as ort

    if threads < 1:
        raise ValueError("threads must be at least 1")
    rates = _ort_rates(_matmul_integer_model,
                       lambda n: {"A": np.random.default_rng(1).integers(0, 256, (n, n), dtype=np.uint8)},
                       threads, sizes, min_time_s, min_iters)
    best = max(rates, key=rates.__getitem__)
    return GemmPeak(threads=threads, gflops=rates[best], size=int(best), by_size=rates, precision="int8",
                    backend=f"onnxruntime {ort.__version__} MatMulInteger u8 x s8 -> s32 (CPU provider)")


def at_least_fewer_threads(peaks: dict[tuple[str, int], GemmPeak]) -> dict[tuple[str, int], GemmPeak]:
    """Each precision's ceiling made non-decreasing in threads: N threads can do what fewer did (a core can
    idle), so a probe at N that read below the one at fewer threads (another job took a core meanwhile) is
    replaced by it, and ``backend`` says so. Input and output keyed by (precision, threads)."""
    out = dict(peaks)
    for (precision, threads), peak in sorted(peaks.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        floor = max((p for (q, t), p in out.items() if q == precision and t < threads),
                    key=lambda p: p.gflops, default=None)
        if floor is not None and floor.gflops > peak.gflops:
            out[(precision, threads)] = peak.model_copy(update={
                "gflops": floor.gflops, "backend": f"{peak.backend}; measured {peak.gflops:.1f} at {threads} "
                f"threads, below {floor.gflops:.1f} at {floor.threads} (a loaded machine): that one is used"})
    return out


def achieved_gflops(macs_per_sample: int | None, batch_size: int, latency_ms: float) -> float | None:
    """``2 * MACs * batch / latency`` in GFLOP/s (GOP/s for INT8); None when MACs are unknown."""
    if not macs_per_sample or latency_ms <= 0:
        return None
    return 2.0 * macs_per_sample * batch_size / (latency_ms / 1e3) / 1e9
