"""Does the prune stage's measured-latency target hold on the quickstart, timed independently?

Runs `edgekd compress recipes/quickstart.yaml` with the prune stage given a latency target
(and, separately, a speed-up target) instead of a ratio, export ONNX, then benchmark only ONNX Runtime at the
target's thread count and batch size. The pruning search times candidates itself; the benchmark
stage times the exported student again afterwards, in a different session, interleaved with the
teacher. The script prints the target, the benchmark's figure, the search's own figure, and
whether the benchmark's figure is within the tolerance (10% by default) of the target.

    python tools/check_prune_target.py                   # latency 20 ms and speed-up 3x, batch 32
    python tools/check_prune_target.py --ms 25 --speedup 2.5 --batch-size 1 --teacher-epochs 6

Exit code 0 when every target holds within the tolerance, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"


def run_quickstart(out: Path, prune: str, args: argparse.Namespace) -> None:
    sets = [
        f"teacher.train.epochs={args.teacher_epochs}",
        f"stages=[{{prune: {{importance: l2, round_to: 8, {prune}}}}}, {{export: {{formats: [onnx]}}}}]",
        f"benchmark={{runtimes: [onnxruntime], threads: [{args.threads}], batch_sizes: [{args.batch_size}], "
        f"min_time_s: {args.min_time}, accuracy_samples: 64}}",
        "gate=null",
    ]
    cmd = [sys.executable, "-m", "edgekd", "compress", str(RECIPE), "--out", str(out)]
    for value in sets:
        cmd += ["--set", value]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        sys.exit(f"edgekd compress failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def student_timing(out: Path, args: argparse.Namespace) -> tuple[float, float]:
    """(student p50 ms, median speed-up over the teacher) from the benchmark stage's file."""
    bench = json.loads((out / "benchmark.json").read_text())
    for row in bench["timings"]:
        if (row["role"] == "student" and row["runtime"] == "onnxruntime" and row["threads"] == args.threads
                and row["batch_size"] == args.batch_size):
            return row["latency"]["p50_ms"], row["speedup_vs_teacher"]
    sys.exit(f"no student timing at {args.threads} thread(s), batch {args.batch_size} in {out / 'benchmark.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", type=float, default=20.0, help="latency target, ms per batch")
    parser.add_argument("--speedup", type=float, default=3.0, help="speed-up target over the teacher")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--teacher-epochs", type=int, default=2, help="latency does not depend on accuracy")
    parser.add_argument("--min-time", type=float, default=1.0, help="benchmark seconds per model")
    parser.add_argument("--tolerance", type=float, default=0.10)
    args = parser.parse_args()

    where = f"runtime: onnxruntime, threads: {args.threads}, batch_size: {args.batch_size}"
    checks = [("latency", f"latency: {{ms: {args.ms}, {where}}}", args.ms),
              ("speedup", f"speedup: {{factor: {args.speedup}, {where}}}", args.speedup)]
    print(f"# prune targets on the quickstart, checked by the benchmark stage (ONNX Runtime CPU, "
          f"{args.threads} thread(s), batch {args.batch_size}); tolerance {args.tolerance:.0%}")
    print(f"{'target':<10}{'asked':>9}{'ratio':>8}{'benchmark':>12}{'bench/asked':>13}  verdict (search's own figure)")
    all_ok = True
    for kind, prune, asked in checks:
        with tempfile.TemporaryDirectory(prefix="edgekd-target-") as tmp:
            out = Path(tmp) / "run"
            run_quickstart(out, prune, args)
            prune_info = json.loads((out / "stages" / "0-prune" / "prune.json").read_text())  # stage 0 of the recipe
            p50, speedup = student_timing(out, args)
        found = prune_info.get("reached", "")
        if kind == "latency":
            measured, ok = p50, p50 <= asked * (1 + args.tolerance)
            shown = f"{p50:.2f} ms"
        else:
            measured, ok = speedup, speedup >= asked * (1 - args.tolerance)
            shown = f"{speedup:.2f}x"
        all_ok &= ok
        print(f"{kind:<10}{asked:>9g}{prune_info['channel_ratio']:>8.3f}{shown:>12}{measured / asked:>12.2f}x  "
              f"{'met' if ok else 'MISSED'} ({found})", flush=True)
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
