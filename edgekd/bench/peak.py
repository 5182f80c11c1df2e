"""How close a model runs to the machine's limit: FP32 and INT8 GEMM micro-benchmarks.

A square FP32 matrix product through PyTorch (MKL / oneDNN / OpenBLAS, whichever it was built
with) is about the fastest dense work a CPU does, so its GFLOP/s at a thread count is a
practical ceiling ("achievable peak", not the datasheet's theoretical one). A model's achieved
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


def int8_gemm_peak(threads: int, *, sizes: tuple[int, ...] = (256, 512, 1024), min_time_s: float = 0.1,
                   min_iters: int = 5) -> GemmPeak:
    """Time a u8 x s8 ``MatMulInteger`` (int32 out) on n x n matrices through ONNX Runtime's CPU provider at
    ``threads`` intra-op threads; keep the fastest size. Raises ``ImportError`` without onnxruntime."""
    import numpy as np
    import onnxruntime as ort

    if threads < 1:
        raise ValueError("threads must be at least 1")
    rates: dict[str, float] = {}
    for n in sizes:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(_matmul_integer_model(n), options, providers=["CPUExecutionProvider"])
        feed = {"A": np.random.default_rng(1).integers(0, 256, (n, n), dtype=np.uint8)}
        stats = measure(lambda s=session, f=feed: s.run(None, f), warmup=2, min_time_s=min_time_s,
                        min_iters=min_iters)
        rates[str(n)] = 2.0 * n**3 / (stats.min_ms / 1e3) / 1e9
    best = max(rates, key=rates.__getitem__)
    return GemmPeak(threads=threads, gflops=rates[best], size=int(best), by_size=rates, precision="int8",
                    backend=f"onnxruntime {ort.__version__} MatMulInteger u8 x s8 -> s32 (CPU provider)")


def achieved_gflops(macs_per_sample: int | None, batch_size: int, latency_ms: float) -> float | None:
    """``2 * MACs * batch / latency`` in GFLOP/s (GOP/s for INT8); None when MACs are unknown."""
    if not macs_per_sample or latency_ms <= 0:
        return None
    return 2.0 * macs_per_sample * batch_size / (latency_ms / 1e3) / 1e9
