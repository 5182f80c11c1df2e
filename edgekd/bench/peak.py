"""How close a model runs to the machine's limit: an FP32 GEMM micro-benchmark.

A square FP32 matrix product through PyTorch (MKL / oneDNN / OpenBLAS, whichever it was built
with) is about the fastest dense work a CPU does, so its GFLOP/s at a thread count is a
practical ceiling ("achievable peak", not the datasheet's theoretical one). A model's achieved
rate is ``2 * MACs * batch / latency``; its share of the ceiling says whether there is speed
left to win (a small share at batch 1 is usual: overheads, memory traffic, small layers).
INT8 models do integer operations, so their rate is GOP/s and may exceed the FP32 ceiling.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from edgekd.bench.latency import measure


class GemmPeak(BaseModel):
    """The best FP32 GEMM rate measured at one thread count."""

    threads: int
    gflops: float = Field(..., description="best 2*n^3 / fastest call over the sizes tried, in GFLOP/s")
    size: int = Field(..., description="n of the n x n @ n x n product that reached it")
    by_size: dict[str, float] = Field(default_factory=dict, description="GFLOP/s for each size tried")
    backend: str = "torch.mm float32"


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


def achieved_gflops(macs_per_sample: int | None, batch_size: int, latency_ms: float) -> float | None:
    """``2 * MACs * batch / latency`` in GFLOP/s (GOP/s for INT8); None when MACs are unknown."""
    if not macs_per_sample or latency_ms <= 0:
        return None
    return 2.0 * macs_per_sample * batch_size / (latency_ms / 1e3) / 1e9
