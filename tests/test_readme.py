"""README's two set-up commands stay true: the main job and the test command CI calls."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in quick.splitlines() if line.startswith("    ")]


def test_readme_has_exactly_the_two_setup_commands():
    main, tests = commands()
    for cmd in (main, tests):
        # torch 2.13.0 (CPU, from local disk here) must be installed before anything that depends on torch
        assert cmd.index("pip install torch==2.13.0") < cmd.index("pip install -e")
    assert main.endswith("edgekd compress recipes/quickstart.yaml")
    assert tests.endswith("pytest")
    assert (ROOT / "recipes" / "quickstart.yaml").is_file()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    pattern = re.search(r"sed -n '(.*)' README.md", ci)
    assert pattern, "CI must read its test command from README.md"
    assert "pytest" in commands()[1]
