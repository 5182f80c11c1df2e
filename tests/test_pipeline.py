"""The runner: run directory, manifest, lock, resume after an interrupted stage, the quickstart end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgekd.errors import RunLockedError
from edgekd.pipeline.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
# the quickstart recipe, shrunk for tests: a standard-width teacher, 2 epochs, 16x16 images
QUICK = ["teacher.train.epochs=2", "teacher.kwargs={width: 16}", "data.image_size=16"]


def _edgekd(*args, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgekd", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _sets(values: list[str]) -> list[str]:
    return [arg for v in values for arg in ("--set", v)]


def test_lock_refuses_a_second_process_and_takes_over_a_stale_one(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.lock():
        with pytest.raises(RunLockedError, match="in use"):
            with RunDir(tmp_path / "run").lock():
                pass
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run" / "run.lock").write_text(str(dead.pid))
    with run.lock():
        assert (tmp_path / "run" / "run.lock").read_text() == str(os.getpid())
    assert not (tmp_path / "run" / "run.lock").exists()


def test_resume_requires_same_recipe(tmp_path):
    out = tmp_path / "run"
    recipe = ROOT / "recipes" / "quickstart.yaml"
    first = _edgekd("compress", str(recipe), *_sets(QUICK + ["stages=[]", "benchmark=null", "gate=null"]),
                    "--out", str(out), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["done"]
    assert manifest["teacher"]["val_accuracy"] > 50
    assert (out / "teacher" / "teacher.pt").is_file() and (out / "recipe.yaml").is_file()
    changed = _edgekd("compress", str(recipe), *_sets(QUICK + ["stages=[]", "benchmark=null", "gate=null",
                                                                  "seed=5"]),
                      "--out", str(out), "--resume", cwd=tmp_path)
    assert changed.returncode == 2 and "differs" in changed.stderr


def test_resume_after_an_interrupted_stage(tmp_path):
    """Kill the run during distillation; --resume keeps the teacher and finishes the stage."""
    out = tmp_path / "run"
    sets = _sets(QUICK + ["stages=[{distill: {epochs: 12}}]", "benchmark=null", "gate=null"])
    recipe = str(ROOT / "recipes" / "quickstart.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "edgekd", "compress", recipe, *sets, "--out", str(out)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 300
    metrics = out / "stages"
    while time.time() < deadline and proc.poll() is None:
        if any(metrics.glob("**/metrics.csv")) and len(next(metrics.glob("**/metrics.csv")).read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"][0]["status"] == "done" and manifest["stages"][1]["status"] == "running"
    teacher_hash = manifest["stages"][0]["outputs"]["teacher/teacher.pt"]

    resumed = _edgekd("compress", recipe, *sets, "--out", str(out), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["done", "done"]
    assert manifest["stages"][0]["outputs"]["teacher/teacher.pt"] == teacher_hash
    assert "skip" not in resumed.stderr or "teacher" not in resumed.stderr.split("skip")[0]
    assert (out / "student" / "after-0-distill.pt").is_file()


def test_resume_keeps_the_artifacts_of_finished_stages(tmp_path):
    """A resumed run restores the earlier stages' files before it saves anything, so a benchmark
    run after the resume still finds the exported student (it once lost them and timed torch only)."""
    out = tmp_path / "run"
    recipe = str(ROOT / "recipes" / "quickstart.yaml")
    sets = _sets(QUICK + ["stages=[{export: {formats: [onnx], verify: {samples: 32}}}]", "benchmark=null",
                          "gate=null"])
    first = _edgekd("compress", recipe, *sets, "--out", str(out), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = json.loads((out / "manifest.json").read_text())["artifacts"]
    assert {"artifacts/student.onnx", "artifacts/teacher.onnx"} <= {a["path"] for a in before}
    again = _edgekd("compress", recipe, *sets, "--out", str(out), "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "skip 0-export" in again.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artifacts"] == before
    report = json.loads((out / "report.json").read_text())
    assert {"artifacts/student.onnx", "artifacts/teacher.onnx"} <= {a["path"] for a in report["artifacts"]}


def test_a_teacher_at_chance_stops_the_run_instead_of_being_compressed(tmp_path):
    out = tmp_path / "run"
    recipe = str(ROOT / "recipes" / "quickstart.yaml")
    sets = _sets(QUICK + ["teacher.train.epochs=1", "teacher.train.lr=1e-7", "teacher.train.warmup_epochs=0",
                          "teacher.train.guard={enabled: false}", "benchmark=null", "gate=null"])
    proc = _edgekd("compress", recipe, *sets, "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 1 and "chance" in proc.stderr and "teaches nothing" in proc.stderr, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"][0]["status"] == "failed" and "chance" in manifest["stages"][0]["error"]
    assert all(s["status"] == "pending" for s in manifest["stages"][1:])  # nothing was pruned or distilled
