"""Trust check for the latency harness: does it report what a plain stopwatch loop sees?

Times one model (ResNet-20, exported with edgekd's ONNX exporter, on ONNX Runtime, 1 thread,
batch 32 by default) two ways, in alternating blocks in the same process so machine drift hits
both alike:

- the harness: ``edgekd.bench.latency.measure`` (warm-up, rounds, statistics);
- an independent loop: ``n`` back-to-back calls between two ``time.perf_counter_ns`` reads
  (mean = elapsed / n), plus the median of per-call stopwatch readings.

It prints each block and the ratios harness / plain of the mean and the median over blocks.
The target is a ratio within 5% of 1.0. Weights are untrained: timing does not depend on them.

    python tools/check_harness.py [--batch 32] [--threads 1] [--blocks 8] [--model resnet20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekd.bench.latency import measure  # noqa: E402
from edgekd.export.onnx_export import export_onnx  # noqa: E402
from edgekd.models import build_model  # noqa: E402
from edgekd.runtimes.registry import get_runtime  # noqa: E402


def plain_loop(fn, n: int) -> tuple[float, float]:
    """(mean ms from total elapsed / n, median ms of per-call readings) of n calls."""
    per_call = []
    start = time.perf_counter_ns()
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        per_call.append(time.perf_counter_ns() - t0)
    total = time.perf_counter_ns() - start
    return total / n / 1e6, float(np.median(per_call)) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=8, help="harness/plain pairs (alternating)")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per harness measurement")
    args = parser.parse_args()

    torch.set_num_threads(1)
    shape = (1, args.image_size, args.image_size)
    model = build_model(args.model, num_classes=10, input_shape=shape).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, torch.randn(2, *shape), path)
        loaded = get_runtime("onnxruntime").load(path, args.threads)
        x = np.random.default_rng(0).standard_normal((args.batch, *shape)).astype(np.float32)

        def call():
            return loaded.run(x)

        for _ in range(5):  # warm both paths' caches before the first block
            call()
        print(f"{args.model} on onnxruntime, {args.threads} thread(s), batch {args.batch}")
        print(f"{'block':>5} {'harness p50':>12} {'harness mean':>13} {'plain median':>13} {'plain mean':>11} "
              f"{'iters':>6}")
        h_p50, h_mean, p_med, p_mean = [], [], [], []
        h_iters = 20
        for block in range(args.blocks):
            # ABBA order: harness first in even blocks, plain loop first in odd ones, so a slow drift
            # does not always favour the same side
            if block % 2 == 0:
                stats = measure(call, warmup=3, min_time_s=args.min_time, min_iters=20, batch_size=args.batch)
                mean_ms, median_ms = plain_loop(call, stats.iters)  # the same number of calls
            else:
                mean_ms, median_ms = plain_loop(call, h_iters)
                stats = measure(call, warmup=3, min_time_s=args.min_time, min_iters=20, batch_size=args.batch)
            h_iters = stats.iters
            h_p50.append(stats.p50_ms)
            h_mean.append(stats.mean_ms)
            p_med.append(median_ms)
            p_mean.append(mean_ms)
            print(f"{block:>5} {stats.p50_ms:>12.3f} {stats.mean_ms:>13.3f} {median_ms:>13.3f} {mean_ms:>11.3f} "
                  f"{stats.iters:>6}")
    # per block pair the two ran seconds apart; the median over blocks of their ratio is robust to a
    # block hit by another process's burst
    ratio_median = statistics.median(h / p for h, p in zip(h_p50, p_med, strict=True))
    ratio_mean = statistics.median(h / p for h, p in zip(h_mean, p_mean, strict=True))
    print(f"harness / plain, median latency: {ratio_median:.3f}   mean latency: {ratio_mean:.3f}   "
          f"({'within' if abs(ratio_median - 1) <= 0.05 and abs(ratio_mean - 1) <= 0.05 else 'OUTSIDE'} 5%)")


if __name__ == "__main__":
    main()
