"""Run ``edgekd compress`` on a recipe in a subprocess, as a user would (shared by tools/zoo.py and
tools/check_recovery.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class CompressRun:
    exit_code: int  # 124 when stopped at the timeout
    stdout: str
    stderr: str
    seconds: float


def run_compress(recipe: Path, run_dir: Path, *, nice: int = 0, timeout: float | None = None) -> CompressRun:
    """``edgekd compress RECIPE --out RUN_DIR`` from the repository root with this checkout on PYTHONPATH,
    under ``nice -n NICE`` when given; output captured, also when it times out."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "edgekd", "compress", str(recipe), "--out", str(run_dir)]
    if nice:
        command = ["nice", "-n", str(nice), *command]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        code, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        code = 124
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    return CompressRun(code, stdout, stderr, round(time.perf_counter() - started, 1))
