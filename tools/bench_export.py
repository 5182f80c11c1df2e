"""Export-stage cost: the two roles exported one after the other vs in parallel, and ExecuTorch's import.

The models are the quickstart's, built as ``recipes/quickstart.yaml`` builds them (its image size,
teacher architecture and prune stage), untrained: export time does not depend on the weights.
Every measurement runs in a fresh Python process, as a user's ``edgekd compress`` does, because
the first export in a process pays one-time costs (imports, the exporters' first-call set-up)
that a warm process would hide. Modes alternate (sequential, parallel, sequential, ...) so drift
on a shared machine hits both alike; the ratio of the medians is printed.

    python tools/bench_export.py             # 2 rounds of each mode, plus the import timing
    python tools/bench_export.py --rounds 3
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

_IMPORTS = {
    "portable_lib (what executorch.runtime imports)": "import executorch.extension.pybindings.portable_lib",
    "edgekd's loader (torch + pybindings._C)": "import torch; from executorch.extension.pybindings import _C",
}


def _jobs(out_dir: Path):
    from quickstart_models import quickstart_models

    from edgekd.export.config import ExportConfig
    from edgekd.export.stage import ExportJob

    teacher, student, data = quickstart_models()
    cfg = ExportConfig(formats=["onnx", "ort", "pte"])
    x_val, _ = data.val_tensors(cfg.verify.samples)
    example = data.example_batch(2)
    return {role: ExportJob(role, model.eval(), example, out_dir, cfg) for role, model in
            (("teacher", teacher), ("student", student))}, x_val


def run_once(mode: str) -> float:
    """One export of both roles in this (fresh) process; seconds, models built beforehand."""
    from edgekd.export.stage import _export_role_in_child, export_role

    with tempfile.TemporaryDirectory() as tmp:
        jobs, x_val = _jobs(Path(tmp))
        started = time.perf_counter()
        if mode == "sequential":
            outcomes = [export_role(job, x_val) for job in jobs.values()]
        else:  # what the stage does: the teacher in a spawned child, the student here
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                future = pool.submit(_export_role_in_child, jobs["teacher"], x_val)
                outcomes = [export_role(jobs["student"], x_val), future.result()]
        seconds = time.perf_counter() - started
    failed = [o.error for o in outcomes if o.error is not None]
    if failed:
        raise SystemExit(f"export failed: {failed[0]}")
    return seconds


def _fresh(args: list[str]) -> float:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each mode (alternating)")
    parser.add_argument("--once", choices=["sequential", "parallel"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.once:
        print(run_once(args.once))
        return

    import platform

    print(f"# export of the quickstart's teacher and student to onnx, ort and pte (parity included); "
          f"{platform.processor() or platform.machine()}, {multiprocessing.cpu_count()} cores, torch {torch.__version__}")
    times: dict[str, list[float]] = {"sequential": [], "parallel": []}
    for r in range(args.rounds):
        for mode in times:
            seconds = _fresh([__file__, "--once", mode])
            times[mode].append(seconds)
            print(f"round {r + 1}  {mode:<10}  {seconds:6.1f} s", flush=True)
    seq, par = statistics.median(times["sequential"]), statistics.median(times["parallel"])
    print(f"median: sequential {seq:.1f} s, parallel {par:.1f} s -> parallel saves {seq - par:.1f} s ({seq / par:.2f}x)")

    print("\n# importing ExecuTorch's runtime in a fresh process (what each .pte memory measurement pays)")
    for label, code in _IMPORTS.items():
        runs = [_fresh(["-c", f"import time; t = time.perf_counter(); {code}; print(time.perf_counter() - t)"])
                for _ in range(args.rounds)]
        print(f"{label:<48} {statistics.median(runs):5.2f} s  (runs: {', '.join(f'{v:.2f}' for v in runs)})")


if __name__ == "__main__":
    main()
