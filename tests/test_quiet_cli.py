"""A quiet terminal: `edgekd validate` of a recipe whose teacher is a Hugging Face model prints its own result
and nothing on stderr; `--debug` shows the libraries' messages again (torchao's "Failed to load ..._C_mxfp8" on a
CPU build of torch, torch's _pytree deprecation notice), so the filters hide exactly those."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """
name: hf-quiet
data: {dataset: digits, image_size: 32}
teacher: {factory: "tests.zoo_models:hf_resnet", train: {epochs: 1}}
student: {from: teacher}
stages:
  - prune: {importance: l2, ratio: 0.5}
  - export: {formats: [onnx, pte]}
  - quantize: {method: {kind: ort_static, calibration: {samples: 64}}, also: [{kind: executorch, samples: 64}]}
"""


def _validate(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "hf.yaml").write_text(RECIPE)
    return subprocess.run([sys.executable, "-m", "edgekd", *flags, "validate", str(tmp_path / "hf.yaml")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})


@pytest.mark.skipif(not (importlib.util.find_spec("transformers") and importlib.util.find_spec("torchao")),
                    reason="needs transformers and torchao (the executorch extra)")
def test_validate_of_a_hugging_face_teacher_prints_nothing_on_stderr(tmp_path):
    proc = _validate(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""
    assert proc.stdout.startswith("ok ") and "stages: prune, export, quantize" in proc.stdout
    assert "1169 train / 269 val / 359 test" in proc.stdout  # the three splits (test: what is reported)
    debug = _validate(tmp_path, "--debug")
    assert debug.returncode == 0 and debug.stdout == proc.stdout
    # what the filters hid is real library output, shown with --debug (not a test of an empty stream)
    assert "torchao" in debug.stderr or "_pytree" in debug.stderr, debug.stderr[-2000:]


@pytest.mark.parametrize("argv, says", [
    (["compress", "--nope", "r.yaml"], "No such option: --nope"),
    (["compress"], "Missing argument"),
    (["bogus"], "No such command 'bogus'"),
])
def test_usage_errors_exit_2_with_the_parser_message_and_no_traceback(argv, says):
    """Typer 0.29 raises usage errors from its own copy of click (``typer._click``), not click's classes: each
    must still be a usage message and exit code 2, never a traceback."""
    proc = subprocess.run([sys.executable, "-m", "edgekd", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert says in proc.stderr and "Traceback" not in proc.stderr and "Usage: " in proc.stderr


def test_out_that_cannot_be_a_folder_exits_2_naming_it(tmp_path):
    """--out naming an existing file (or a path below one) is bad input: exit 2, the path and a fix, no
    traceback (it was a FileExistsError / NotADirectoryError from mkdir, exit 1)."""
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        proc = subprocess.run([sys.executable, "-m", "edgekd", "compress", "recipes/quickstart.yaml", "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "cannot make the run directory" in proc.stderr and "Traceback" not in proc.stderr
