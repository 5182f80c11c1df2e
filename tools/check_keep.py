"""Which epoch should recovery training keep? The quickstart's prune + distill, per seed, scored three ways.

For each seed, the quickstart recipe with its export, quantize and benchmark stages removed and
``keep: best_val_accuracy`` set on the distill stage (so the stage writes ``best.pt``, the best val
top-1 epoch, and ``last.pt``, the last epoch) runs through ``edgekd compress`` in a subprocess. Then
both checkpoints are scored on the test split (which no rule reads) and the epoch the best-val-loss
rule would pick is read from the stage's ``metrics.csv``. Printed per seed: the teacher's test top-1,
and for each rule the epoch and the student's test drop against the teacher (points).

    python tools/check_keep.py --seeds 5 6 7 8 9
    python tools/check_keep.py --seeds 0 --out /tmp/keep --nice 5
    python tools/check_keep.py --seeds 0 1 2 3 4 --distill batch_size=32 --distill epochs=8

The rule adopted from this measurement (``keep: last`` from trained weights) is in docs/distill.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgekd.data import load_data  # noqa: E402
from edgekd.models.evaluate import top1_accuracy  # noqa: E402
from edgekd.models.portable import load_portable  # noqa: E402
from edgekd.recipe.load import load_recipe  # noqa: E402
from tools._compress import run_compress  # noqa: E402

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def prune_distill_recipe(out: Path, seed: int, distill_extra: dict | None = None) -> Path:
    """The quickstart with only its prune and distill stages, the distill stage keeping the best val top-1,
    at ``seed`` (which sets the teacher's initial weights, the batch order and the train/val/test split)."""
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["seed"] = seed
    stages = [s for s in recipe["stages"] if next(iter(s)) in ("prune", "distill")]
    for stage in stages:
        if "distill" in stage:
            stage["distill"] = {**stage["distill"], **(distill_extra or {}), "keep": "best_val_accuracy"}
    recipe.update(stages=stages, benchmark=None)
    path = out / f"recipe-seed{seed}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def score_seed(recipe: Path, run: Path, seed: int) -> dict[str, float | int]:
    """Test top-1 of the teacher and of the student at each rule's epoch (percent)."""
    doc = load_recipe(recipe, [f"seed={seed}"])
    data = load_data(doc.recipe.data, seed)
    x, y = data.test_tensors(len(data.test))
    stage = next(p for p in (run / "stages").iterdir() if p.name.endswith("-distill"))
    student = load_portable(run / "student" / "after-0-prune.pt")
    student = student[0] if isinstance(student, tuple) else student
    scores: dict[str, float | int] = {}
    for rule, name in (("best_val_accuracy", "best.pt"), ("last", "last.pt")):
        checkpoint = torch.load(stage / name, map_location="cpu", weights_only=True)
        student.load_state_dict(checkpoint["model"])
        scores[rule] = top1_accuracy(student.eval(), x, y)
        scores[f"{rule}_epoch"] = int(checkpoint["epoch"])
    rows = list(csv.DictReader((stage / "metrics.csv").open()))
    losses = [float(r["val_loss"]) for r in rows]
    scores["best_val_loss_epoch"] = losses.index(min(losses)) + 1
    ledger = json.loads((run / "report.json").read_text())["ledger"]
    scores["teacher"] = next(r["test_accuracy"] for r in ledger if r["stage"] == "teacher")
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[5, 6, 7, 8, 9])
    parser.add_argument("--out", type=Path, default=Path("/tmp/edgekd-check-keep"))
    parser.add_argument("--nice", type=int, default=0)
    parser.add_argument("--distill", action="append", default=[], metavar="KEY=VALUE",
                        help="set a key of the distill stage (YAML value), e.g. batch_size=32; repeatable")
    args = parser.parse_args()
    distill_extra = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.distill)}
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    print("seed | teacher | best val top-1: epoch, drop | last: epoch, drop | best val loss: epoch")
    for seed in args.seeds:
        run = args.out / f"seed{seed}"
        recipe = prune_distill_recipe(args.out, seed, distill_extra)
        done = run_compress(recipe, run, nice=args.nice)
        if done.exit_code not in (0, 3):  # 3: the gate failed, the run and its files are complete
            print(f"{seed} | run failed (exit {done.exit_code}): {done.stderr.strip().splitlines()[-1:]}")
            continue
        s = score_seed(recipe, run, seed)
        print(f"{seed} | {s['teacher']:.2f} | {s['best_val_accuracy_epoch']}, "
              f"{s['teacher'] - s['best_val_accuracy']:.2f} | {s['last_epoch']}, {s['teacher'] - s['last']:.2f} | "
              f"{s['best_val_loss_epoch']}  ({done.seconds:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
