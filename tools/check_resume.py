"""Kill a small run with SIGKILL at three points, resume each with ``--resume``, compare with a clean run.

    python tools/check_resume.py [--seed 0] [--work DIR]

The run: the quickstart recipe shrunk to seconds (digits at 8x8, a width-8 ResNet-20 teacher, prune,
distill, export to ONNX). Kill points: during teacher training, during distillation, during export
(each found from the run's manifest: the step is "running" and, for training, at least one epoch
is logged). For each: SIGKILL the ``edgekd compress`` process (as an OOM killer would), check that
no process it started is alive 5 s later, resume, and compare with an uninterrupted run of the same
seed: the same ledger accuracies, the same artifact list, no temporary (``.*`` dot-prefixed) files
left anywhere in the run directory. A last check: a ``run.lock`` left by the killed process does
not block the resume (the kernel drops an flock with its holder). Prints one line per kill point.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"


def _sets(seed: int, teacher_epochs: int, distill_epochs: int) -> list[str]:
    values = [
        f"seed={seed}", "data.image_size=8", "teacher.kwargs.width=8", f"teacher.train.epochs={teacher_epochs}",
        f"stages=[{{prune: {{ratio: 0.5, round_to: 4, probe: null}}}}, {{distill: {{epochs: {distill_epochs}}}}},"
        " {export: {formats: [onnx, ort]}}]",
        "benchmark=null", "gate=null",
    ]
    return [arg for v in values for arg in ("--set", v)]


def _command(out: Path, sets: list[str], resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "edgekd", "compress", str(RECIPE), *sets, "--out", str(out),
            *(["--resume"] if resume else [])]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _stage_running(out: Path, key_prefix: str, min_epochs: int) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    for stage in manifest["stages"]:
        if stage["key"].split("-", 1)[-1].startswith(key_prefix) and stage["status"] == "running":
            if min_epochs == 0:
                return True
            # match on the path inside the run: the run folder itself is named after the kill point
            logs = [log for log in out.glob("**/metrics.csv") if key_prefix in str(log.relative_to(out))]
            return any(len(log.read_text().splitlines()) > min_epochs for log in logs)
    return False


def _summary(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    leftovers = [str(p.relative_to(out)) for p in out.rglob(".*") if p.is_file()]
    return {
        "statuses": [s["status"] for s in manifest["stages"]],
        "ledger": [(row["stage"], round(row["val_accuracy"], 3) if row.get("val_accuracy") is not None else None)
                   for row in manifest["ledger"]],
        "artifacts": sorted(a["path"] for a in manifest["artifacts"]),
        "leftovers": leftovers,
    }


def kill_and_resume(work: Path, name: str, sets: list[str], key_prefix: str, min_epochs: int) -> dict:
    out = work / name
    proc = subprocess.Popen(_command(out, sets), cwd=work, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline and not _stage_running(out, key_prefix, min_epochs):
        time.sleep(0.05)
    if proc.poll() is not None:
        return {"error": f"the run ended (exit {proc.returncode}) before the {key_prefix} step could be killed"}
    children = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(5)
    orphans = sorted(pid for pid in children if _alive(pid))
    resumed = subprocess.run(_command(out, sets, resume=True), cwd=work, env=_env(), capture_output=True, text=True,
                             timeout=900)
    if resumed.returncode != 0:
        return {"error": f"resume exited {resumed.returncode}: {resumed.stderr.strip().splitlines()[-1:]}"}
    return {"children_at_kill": len(children), "orphans_after_5s": orphans, **_summary(out)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="edgekd-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    sets = _sets(args.seed, teacher_epochs=6, distill_epochs=6)
    clean = subprocess.run(_command(work / "clean", sets), cwd=work, env=_env(), capture_output=True, text=True,
                           timeout=900)
    if clean.returncode != 0:
        print(f"the uninterrupted run failed: {clean.stderr.strip().splitlines()[-1:]}")
        return 1
    reference = _summary(work / "clean")
    print(f"uninterrupted run: ledger {reference['ledger']}, {len(reference['artifacts'])} artifacts")
    ok = True
    for name, key, min_epochs in (("kill-teacher", "teacher", 1), ("kill-distill", "distill", 1),
                                  ("kill-export", "export", 0)):
        result = kill_and_resume(work, name, sets, key, min_epochs)
        if "error" in result:
            print(f"{name}: FAILED: {result['error']}")
            ok = False
            continue
        same = (result["ledger"] == reference["ledger"] and result["artifacts"] == reference["artifacts"]
                and set(result["statuses"]) == {"done"})
        clean_dir = not result["leftovers"] and not result["orphans_after_5s"]
        ok &= same and clean_dir
        print(f"{name}: {'same result' if same else 'DIFFERENT result'}; ledger {result['ledger']}; "
              f"{result['children_at_kill']} child processes at the kill, "
              f"{len(result['orphans_after_5s'])} alive 5 s later; temporary files left: {result['leftovers'] or 0}")
    print(f"runs in {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
