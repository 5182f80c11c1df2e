"""Mutate the example recipes and run ``edgekd validate`` on each; print counts by outcome.

    python tools/fuzz_recipes.py --count 500 [--seed 0] [--show 5]

Every mutation (tests/recipe_mutations.py) makes the recipe invalid, so the only good outcome is
"exit 2 with file:line": the command's exit code, a message naming the mutated file and a line,
no traceback, nothing written beside the recipe, and done within ``--timeout`` seconds. The
command runs in this process (``edgekd.cli.main`` with its stderr captured), so 500 recipes take a
minute or two instead of 500 interpreter start-ups; an exception that escapes ``main`` is what a
user would see as a traceback.
"""

from __future__ import annotations

import argparse
import collections
import random
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.recipe_mutations import EXAMPLES, MUTATIONS, mutate  # noqa: E402


def _validate(path: Path) -> tuple[int, str]:
    """Run ``edgekd validate PATH`` in this process; (exit code, stderr). Escaping exceptions propagate."""
    import contextlib
    import io

    from edgekd.cli import main as cli_main

    err = io.StringIO()
    argv = sys.argv
    sys.argv = ["edgekd", "validate", str(path)]
    try:
        with contextlib.redirect_stderr(err):
            cli_main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    return code, err.getvalue()


def run_one(example: Path, kind: str, seed: int, timeout: float) -> tuple[str, str, str]:
    """(kind, outcome, detail) for one mutated recipe."""
    import time

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mutated.yaml"
        path.write_bytes(mutate(example, kind, seed))
        started = time.monotonic()
        try:
            code, err = _validate(path)
        except Exception as exc:  # noqa: BLE001 - this is the outcome being counted
            return kind, "traceback", f"{example.name} seed {seed}: {type(exc).__name__}: {exc}"[:300]
        elapsed = time.monotonic() - started
        written = sorted(p.name for p in Path(folder).iterdir() if p.name != "mutated.yaml")
    detail = f"{example.name} seed {seed}: {err.strip().splitlines()[0] if err.strip() else '(no message)'}"
    if elapsed > timeout:
        return kind, "slow", f"{detail} ({elapsed:.1f} s)"
    if written:
        return kind, "wrote files", f"{detail} ({', '.join(written)})"
    if code == 0:
        return kind, "accepted (exit 0)", detail
    if code != 2:
        return kind, f"exit {code}", detail
    if not re.search(r"mutated\.yaml:\d+", err):
        return kind, "exit 2 without a line", detail
    return kind, "exit 2 with file:line", detail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=500, help="mutated recipes to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per recipe before it counts as slow")
    parser.add_argument("--show", type=int, default=5, help="examples to print per bad outcome")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    plan = [(rng.choice(EXAMPLES), rng.choice(sorted(MUTATIONS)), rng.randrange(2**31)) for _ in range(args.count)]
    results = [run_one(*job, args.timeout) for job in plan]
    by_outcome = collections.Counter(outcome for _, outcome, _ in results)
    by_kind = collections.Counter((kind, outcome) for kind, outcome, _ in results)
    print(f"{len(results)} mutated recipes (seed {args.seed})")
    for outcome, n in by_outcome.most_common():
        print(f"  {outcome:<24} {n:5d}  ({100 * n / len(results):.1f}%)")
    print("by mutation:")
    for (kind, outcome), n in sorted(by_kind.items()):
        print(f"  {kind:<14} {outcome:<24} {n:5d}")
    bad = [r for r in results if r[1] != "exit 2 with file:line"]
    shown: collections.Counter = collections.Counter()
    for kind, outcome, detail in bad:
        if shown[outcome] < args.show:
            shown[outcome] += 1
            print(f"  [{outcome}] {kind}: {detail}")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
