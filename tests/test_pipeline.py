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
    # the teacher came back from the run directory: loaded, not trained again
    assert manifest["teacher"]["source"] == "run directory (resumed)"
    assert "teacher epoch" not in resumed.stderr
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
    # what a SIGKILL between writing and renaming leaves (atomic_path's temporary name); a user's dot-file stays
    leftover = out / "artifacts" / ".student.so3920wd.onnx"
    leftover.write_bytes(b"half an onnx file")
    (out / ".notes").write_text("mine")
    again = _edgekd("compress", recipe, *sets, "--out", str(out), "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "skip 0-export" in again.stderr
    assert not leftover.exists() and (out / ".notes").read_text() == "mine"
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


# Iterative compression: a kind of stage twice in one recipe (prune, distill, prune, distill).
ITERATIVE = """
name: iterative
seed: 0
data: {dataset: digits, image_size: 8}
teacher: {model: mlp, kwargs: {hidden: 32}, train: {epochs: 2}}
stages:
  - prune: {ratio: 0.3, probe: null}
  - distill: {epochs: 2}
  - prune: {ratio: 0.5, probe: null}
  - distill: {epochs: 6}
benchmark: null
gate: null
"""
ITERATIVE_KEYS = ["teacher", "0-prune", "1-distill", "2-prune", "3-distill"]


def _iterative_recipe(work: Path) -> Path:
    recipe = work / "iterative.yaml"
    recipe.write_text(ITERATIVE)
    return recipe


def _assert_outputs_unchanged(out: Path, manifest: dict) -> None:
    """Every file a finished stage's outputs name is still the file the manifest hashed."""
    from edgekd.fileio import sha256_file

    for stage in manifest["stages"]:
        assert stage["status"] == "done" and stage["outputs"], stage["key"]
        for rel, digest in stage["outputs"].items():
            assert sha256_file(out / rel) == digest, f"{rel} of {stage['key']} was replaced after it was hashed"


@pytest.fixture(scope="module")
def iterative_run(tmp_path_factory):
    """One uninterrupted run of the iterative recipe (the reference for the kill-and-resume test)."""
    work = tmp_path_factory.mktemp("iterative")
    out = work / "run"
    proc = _edgekd("compress", str(_iterative_recipe(work)), "--out", str(out), cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_repeated_stages_keep_their_own_files_report_data_and_ledger_rows(iterative_run):
    out = iterative_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["key"] for s in manifest["stages"]] == ITERATIVE_KEYS
    _assert_outputs_unchanged(out, manifest)
    # each stage entry works in its own folder: two prune reports, two training histories
    first, second = (json.loads((out / "stages" / k / "prune.json").read_text()) for k in ("0-prune", "2-prune"))
    assert first["target"] != second["target"] and second["after"]["params"] < first["after"]["params"]
    for key, epochs in (("1-distill", 2), ("3-distill", 6)):
        lines = (out / "stages" / key / "metrics.csv").read_text().splitlines()
        assert len(lines) == 1 + epochs and (out / "stages" / key / "last.pt").is_file(), key  # header + epochs
    assert not (out / "stages" / "prune").exists() and not (out / "stages" / "distill").exists()
    # report data and ledger rows by position; the second prune starts from the first distill's student
    data = manifest["report_data"]
    assert set(data) == {"0-prune", "1-distill", "2-prune", "3-distill"}
    assert data["0-prune"] == first and data["2-prune"] == second
    assert data["2-prune"]["before"] == data["0-prune"]["after"]
    assert [len(data[k]["history"]) for k in ("1-distill", "3-distill")] == [2, 6]
    assert [(r["stage"], r["key"]) for r in manifest["ledger"]] == [
        ("teacher", "teacher"), ("prune", "0-prune"), ("distill", "1-distill"), ("prune", "2-prune"),
        ("distill", "3-distill")]
    # both stages of each kind reach report.json and report.md, titled with their position
    report = json.loads((out / "report.json").read_text())
    assert report["stage_data"] == data
    assert [s["name"] for s in report["stages"]] == ["teacher", "prune", "distill", "prune", "distill"]
    md = (out / "report.md").read_text()
    headings = [line for line in md.splitlines() if line.startswith("## ") and "(" in line and "-" in line]
    assert headings == ["## Pruning: output channels per layer (0-prune)", "## Pruning steps (0-prune)",
                        "## Distillation epochs (1-distill)", "## Pruning: output channels per layer (2-prune)",
                        "## Pruning steps (2-prune)", "## Distillation epochs (3-distill)"]
    for key in ("1-distill", "3-distill"):
        section = md.split(f"## Distillation epochs ({key})", 1)[1].split("\n## ", 1)[0]
        val = data[key]["history"][1]["val_accuracy"]
        assert "| 2 | " in section and f"{val:.2f}%" in section, key


def test_resume_continues_the_second_distill_from_its_own_checkpoint(iterative_run, tmp_path):
    """SIGKILL after the second distill's first epoch (or a later one: the poll may be late; the stage has
    6 epochs so that it is still running): --resume continues that stage from its own checkpoint (it once
    read the first distill's: "resuming after epoch 3/2") and ends where an uninterrupted run ends."""
    recipe = _iterative_recipe(tmp_path)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "edgekd", "compress", str(recipe), "--out", str(out)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    # wait until the second distill has written one epoch (header + 1 row) in its own folder; a file found
    # by its age instead matched the first distill's when the second prune took under the 0.5 s margin
    metrics = out / "stages" / "3-distill" / "metrics.csv"
    try:
        deadline = time.time() + 1200  # a machine shared by 5 jobs took over 300 s to get there
        while time.time() < deadline and proc.poll() is None:
            try:
                if len(metrics.read_text().splitlines()) >= 2:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["done"] * 4 + ["running"]
    # the killed stage's epochs are in its own folder; the first distill's two epochs are untouched
    done = len((out / "stages" / "3-distill" / "metrics.csv").read_text().splitlines()) - 1
    assert 1 <= done < 6
    assert len((out / "stages" / "1-distill" / "metrics.csv").read_text().splitlines()) == 3
    _assert_outputs_unchanged(out, {"stages": manifest["stages"][:4]})

    resumed = _edgekd("compress", str(recipe), "--out", str(out), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"distill: resuming after epoch {done}/6" in resumed.stderr, resumed.stderr[-3000:]
    assert "skip 1-distill" in resumed.stderr and "skip 2-prune" in resumed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    _assert_outputs_unchanged(out, manifest)
    data = manifest["report_data"]
    assert data["3-distill"]["resumed_from_epoch"] == done and data["1-distill"]["resumed_from_epoch"] is None
    # the same ledger and histories as the uninterrupted run (the trainer resumes bit for bit)
    reference = json.loads((iterative_run / "manifest.json").read_text())
    assert manifest["ledger"] == reference["ledger"]
    for key in ("1-distill", "3-distill"):
        assert [(h["epoch"], h["train_loss"], h["val_accuracy"]) for h in data[key]["history"]] == [
            (h["epoch"], h["train_loss"], h["val_accuracy"]) for h in reference["report_data"][key]["history"]]


def test_report_tables_per_stage_position_and_for_runs_before_position_keys():
    """Report data filed by position gives one titled table per stage; a report or manifest from before
    position keys (data keyed "distill") still renders, and a resumed old manifest files it by position."""
    from edgekd.pipeline.runner import _migrate_report_data
    from edgekd.report.markdown import render_markdown
    from edgekd.report.schema import Report, StageStatus, stage_data_of
    from edgekd.report.stage_tables import stage_tables

    def history(val):
        return {"history": [{"epoch": 1, "lr": 0.01, "train_loss": 0.5, "val_accuracy": val}], "val_at_start": 1.0}

    stages = [StageStatus(index=i, key=k, status="done") for i, k in enumerate(["teacher", "0-distill",
                                                                                 "1-distill"])]
    positioned = Report(generated="now", run_dir="r", name="n", stages=stages,
                        stage_data={"0-distill": history(11.0), "1-distill": history(22.0),
                                    "1-distill/transfer": {"DistillConfig": {"labeled_fraction": 0.5}}})
    tables = stage_tables(positioned)
    assert [t.title for t in tables] == ["Distillation epochs (0-distill)", "Distillation epochs (1-distill)"]
    assert [t.rows[0][-1] for t in tables] == ["11.00%", "22.00%"]
    assert [d["history"][0]["val_accuracy"] for d in stage_data_of(positioned.to_json(), "distill")] == [11, 22]

    older = Report(generated="now", run_dir="r", name="n", stages=stages[:2], stage_data={"distill": history(33.0)})
    assert [t.title for t in stage_tables(older)] == ["Distillation epochs"]
    assert "## Distillation epochs\n" in render_markdown(older) and "33.00%" in render_markdown(older)

    manifest = {"stages": [{"key": "teacher", "status": "done"}, {"key": "0-prune", "status": "done"},
                           {"key": "1-distill", "status": "running"}],
                "report_data": {"prune": {"target": "x"}, "distill": {"history": []}}}
    _migrate_report_data(manifest)
    assert manifest["report_data"] == {"0-prune": {"target": "x"}, "distill": {"history": []}}
