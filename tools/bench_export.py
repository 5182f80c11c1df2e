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
from pathlib import Path

import torch

_IMPORTS = {
    "portable_lib (what executorch.runtime imports)": "import executorch.extension.pybindings.portable_lib",
    "edgekd's loader (torch + pybindings._C)": "import torch; from executorch.extension.pybindings import _C",
}


def run_once(mode: str) -> float:
    """One run of the export stage itself on both roles, in this (fresh) process; seconds.

    ``export.parallel`` is what differs: off exports the roles one after the other, on (the default)
    exports the teacher in a spawned child process meanwhile. The models are built beforehand.
    """
    from quickstart_models import QUICKSTART, quickstart_models

    import edgekd.export.stage  # noqa: F401  (registers the export stage)
    from edgekd.export.config import ExportConfig
    from edgekd.pipeline.rundir import RunDir
    from edgekd.recipe.load import load_recipe
    from edgekd.stage.base import stage_for
    from edgekd.stage.context import RunContext

    teacher, student, data = quickstart_models()
    stage = stage_for(ExportConfig(formats=["onnx", "ort", "pte"], parallel=mode == "parallel"))
    with tempfile.TemporaryDirectory() as tmp:
        ctx = RunContext(recipe=load_recipe(QUICKSTART).recipe, run_dir=RunDir(Path(tmp)), data=data,
                         device=torch.device("cpu"), teacher=teacher.eval(), student=student.eval())
        started = time.perf_counter()
        stage.run(ctx)  # raises when an artifact cannot be made or fails its parity check
        seconds = time.perf_counter() - started
    if ctx.report_data["export"]["parallel_roles"] != (mode == "parallel"):
        raise SystemExit(f"the stage did not run in {mode} mode (a single core?)")
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
