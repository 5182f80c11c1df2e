"""Hostile input: a file handed to edgekd is data and never chooses code to run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgekd.errors import ModelError
from edgekd.models.portable import FORMAT, load_portable, save_portable, trusted_factories
from edgekd.models.spec import ModelSpec

REPO = Path(__file__).resolve().parents[1]


def _hostile_checkpoint(path: Path, marker: Path, *, swaps: dict | None = None) -> None:
    """A portable checkpoint (a plain dict, loads with weights_only=True) whose spec names os:system."""
    payload = {
        "format": FORMAT,
        "spec": {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}},
        "num_classes": 10,
        "input_shape": [1, 8, 8],
        "swaps": swaps or {},
        "structure": {},
        "state_dict": {},
        "extra": {},
    }
    torch.save(payload, path)


def test_hostile_checkpoint_runs_nothing_in_library(tmp_path):
    marker = tmp_path / "pwned"
    _hostile_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(ModelError, match=r"factory 'os:system'.*does not run code") as info:
        load_portable(tmp_path / "evil.pt")
    assert "--factory os:system" in info.value.hint
    assert not marker.exists()


@pytest.mark.parametrize("command", [["benchmark"], ["export", "--to", "onnx"]])
def test_hostile_checkpoint_runs_nothing_from_cli(tmp_path, command):
    marker = tmp_path / "pwned"
    _hostile_checkpoint(tmp_path / "evil.pt", marker)
    argv = [sys.executable, "-m", "edgekd", command[0], str(tmp_path / "evil.pt"), *command[1:]]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    assert "os:system" in proc.stderr and "--factory" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_swap_outside_the_fixed_list_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload_path = tmp_path / "swap.pt"
    model = ModelSpec(model="mlp").build(10, (1, 40))
    save_portable(model, payload_path, spec=ModelSpec(model="mlp"), num_classes=10, input_shape=(1, 40))
    payload = torch.load(payload_path, weights_only=True)
    payload["swaps"] = {"net.0": "edgekd.fileio:os"}  # an edgekd module, but not a swappable class
    torch.save(payload, payload_path)
    with pytest.raises(ModelError, match="not one of edgekd's swappable modules"):
        load_portable(payload_path)
    assert not marker.exists()


def test_factory_checkpoint_loads_only_when_named(tmp_path):
    spec = ModelSpec(factory="tests.factories:dict_net")
    model = spec.build(10, (1, 8, 8)).eval()
    save_portable(model, tmp_path / "user.pt", spec=spec, num_classes=10, input_shape=(1, 8, 8))
    with pytest.raises(ModelError, match="tests.factories:dict_net"):
        load_portable(tmp_path / "user.pt")
    x = torch.randn(3, 1, 8, 8)
    again, _ = load_portable(tmp_path / "user.pt", factories=["tests.factories:dict_net"])
    torch.testing.assert_close(again(x), model(x))
    with trusted_factories(["tests.factories:dict_net"]):  # as the runner does for its recipe's factories
        load_portable(tmp_path / "user.pt")
    with pytest.raises(ModelError):  # the trust ends with the block
        load_portable(tmp_path / "user.pt")


# -- run directories: an atomic lock, no silent overwrite, Ctrl-C ---------------------------------
def _race_worker(path: str, barrier, inside, overlaps, trials: int) -> None:
    import time

    from edgekd.errors import RunLockedError
    from edgekd.pipeline.rundir import RunDir

    for _ in range(trials):
        barrier.wait()
        try:
            with RunDir(Path(path)).lock():
                with inside.get_lock():
                    inside.value += 1
                    if inside.value > 1:
                        overlaps.value += 1
                time.sleep(0.0005)
                with inside.get_lock():
                    inside.value -= 1
        except RunLockedError:
            pass
        barrier.wait()


def test_lock_holds_under_a_race(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    barrier, inside, overlaps = ctx.Barrier(2), ctx.Value("i", 0), ctx.Value("i", 0)
    trials = 300
    workers = [ctx.Process(target=_race_worker, args=(str(tmp_path / "run"), barrier, inside, overlaps, trials))
               for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert overlaps.value == 0, f"both processes held the lock in {overlaps.value} of {trials} trials"


def test_finished_run_directory_is_not_overwritten(tmp_path):
    from edgekd.errors import ConfigError
    from edgekd.pipeline.rundir import RunDir

    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "earlier"}')
    with pytest.raises(ConfigError, match="holds a run already") as info:
        RunDir.choose("quickstart", out, resume=False)
    assert "--resume" in info.value.hint
    assert RunDir.choose("quickstart", out, resume=True).path == out
    assert (out / "manifest.json").read_text() == '{"name": "earlier"}'


def test_ctrl_c_exits_130_with_the_resume_hint(tmp_path):
    import signal
    import time

    (tmp_path / "r.yaml").write_text(
        "name: tiny\ndata: {dataset: digits, image_size: 8, batch_size: 64}\n"
        "teacher: {model: mlp, train: {epochs: 500}}\n")
    # a shell without job control starts background commands with SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: give the run a terminal's default, as a user's shell does
    proc = subprocess.Popen([sys.executable, "-m", "edgekd", "compress", "r.yaml", "--out", "run"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    metrics = tmp_path / "run" / "teacher" / "training"
    while time.monotonic() < deadline and not any(metrics.glob("*")):  # training has started
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "rerun with --resume" in err
    assert "Traceback" not in err


# -- the recipe file is untrusted input -------------------------------------------------------------
QUICKSTART = (REPO / "recipes" / "quickstart.yaml").read_bytes()


def _line_of(needle: bytes) -> int:
    """1-based line of ``needle`` in the quickstart recipe (which changes as the recipe is tuned)."""
    return QUICKSTART[: QUICKSTART.index(needle)].count(b"\n") + 1
_BOMB = b"name: bomb\ndata: {dataset: digits}\nteacher:\n  model: mlp\n  train: {epochs: 1}\n  kwargs:\n" + \
    b"    a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + b"".join(
        f"    a{i}: &a{i} [{', '.join(['*a' + str(i - 1)] * 9)}]\n".encode() for i in range(1, 10))

HOSTILE_RECIPES = {
    # name: (bytes, expected message fragment, expected line)
    "alias bomb": (_BOMB, "expands to more than", 12),
    "random bytes": (bytes(range(128, 256)) * 4, "is not UTF-8 text", 1),
    "utf-16": ("name: x\n".encode("utf-16"), "UTF-16", 1),
    "latin-1 comment": (QUICKSTART.replace(b"# edgekd quickstart", b"# edgekd quickstart \xe9t\xe9", 1),
                        "byte 0xe9 at offset", 1),
    "invalid byte in value": (QUICKSTART.replace(b"name: quickstart", b"name: quick\xffstart"), "byte 0xff",
                              _line_of(b"name: quickstart")),
    "nul in value": (QUICKSTART.replace(b"name: quickstart", b"name: quick\x00start"), "cannot appear",
                     _line_of(b"name: quickstart")),
    "control char": (QUICKSTART.replace(b"name: quickstart", b"name: quick\x07start"), "cannot appear",
                     _line_of(b"name: quickstart")),
    "sequence key": (b"? [a, b]\n: 1\nname: x\n", "a key must be a plain name, not a list", 1),
    "mapping key": (b"name: x\n{a: 1}: 2\n", "a key must be a plain name, not a mapping", 2),
    "deep nesting": (b"name: x\nteacher:\n  kwargs:\n    deep: " + b"[" * 3000 + b"]" * 3000 + b"\n",
                     "nest more than 32 levels", 4),
    "empty": (b"", "the recipe is empty", 1),
    "only comments": (b"# a comment\n\n   \n# another\n", "the recipe is empty", 1),
    "yaml 1.1 sexagesimal": (QUICKSTART.replace(b"epochs: 4  #", b"epochs: 1:30  #"), "integer",
                             _line_of(b"epochs: 4  #")),
    "yaml 1.1 yes": (QUICKSTART.replace(b"max_accuracy_drop: 1.0", b"max_accuracy_drop: yes"), "number",
                     _line_of(b"max_accuracy_drop: 1.0")),
}


@pytest.mark.parametrize("case", list(HOSTILE_RECIPES))
def test_hostile_recipe_is_a_recipe_error_with_a_line(tmp_path, case):
    import time

    from edgekd.errors import RecipeError
    from edgekd.recipe.load import load_recipe

    raw, fragment, line = HOSTILE_RECIPES[case]
    path = tmp_path / "r.yaml"
    path.write_bytes(raw)
    started = time.monotonic()
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert time.monotonic() - started < 5
    assert fragment in info.value.message
    assert info.value.file == str(path)
    if line is not None:
        assert info.value.line == line
    assert list(tmp_path.iterdir()) == [path]  # nothing written


def test_hostile_recipe_from_the_command_line(tmp_path):
    (tmp_path / "bomb.yaml").write_bytes(_BOMB)
    proc = subprocess.run([sys.executable, "-m", "edgekd", "validate", "bomb.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    assert "bomb.yaml:12" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "edgekd", "validate", str(REPO / "recipes" / "quickstart.yaml"),
                           "--set", "name=[unclosed"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    assert "--set 'name=[unclosed': the value is not valid YAML" in proc.stderr
    assert "^" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("override", "fragment"), [
    ("seed=4294967296", "less than or equal to 4294967295"),
    ("name=" + "n" * 300, "at most 100 characters"),
    ("benchmark.batch_sizes=[1e9]", "batch_sizes must be at most 4096"),
    ("benchmark.threads=[1e30]", "exceeded maximum size"),
    ("teacher.kwargs.num_classes=10", "remove 'num_classes' from kwargs"),
])
def test_values_that_would_fail_late_are_refused_at_their_key(override, fragment):
    from edgekd.errors import RecipeError
    from edgekd.recipe.load import load_recipe

    with pytest.raises(RecipeError) as info:
        load_recipe(REPO / "recipes" / "quickstart.yaml", [override])
    assert fragment in info.value.message
    assert info.value.line is not None
    assert info.value.key.startswith(override.split("=")[0].removesuffix(".num_classes"))


def test_damaged_manifest_on_resume_names_the_file(tmp_path):
    from edgekd.errors import ConfigError
    from edgekd.pipeline.rundir import RunDir

    run = RunDir(tmp_path)
    (tmp_path / "manifest.json").write_text('{"schema": "edgekd.manifest/1", "stag')  # cut by a crash
    with pytest.raises(ConfigError, match=r"manifest.json is damaged and cannot be resumed"):
        run.read_manifest()


@pytest.mark.parametrize("kwargs", [{"width": -1}, {"width": 0}, {"width": 1.5}, {"width": float("nan")},
                                    {"width": 1000000}, {"bogus": 1}])
def test_builder_errors_are_model_errors_naming_the_values(kwargs):
    with pytest.raises(ModelError) as info:
        ModelSpec(model="resnet20", kwargs=kwargs).build(10, (1, 8, 8))
    assert "resnet20" in info.value.message
    assert str(next(iter(kwargs))) in info.value.message


def test_factory_that_raises_is_a_located_recipe_error(tmp_path):
    (tmp_path / "r.yaml").write_text("name: x\ndata: {dataset: digits, image_size: 8}\n"
                                     "teacher:\n  factory: tests.factories:dict_net\n  kwargs: {width: -3}\n"
                                     "  train: {epochs: 1}\n")
    proc = subprocess.run([sys.executable, "-m", "edgekd", "validate", "r.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    assert "r.yaml:" in proc.stderr and "width=-3" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_export_child_dies_with_a_killed_run(tmp_path):
    """The export stage's spawned child (and so multiprocessing's resource tracker) ends with its parent."""
    import signal
    import time

    code = (
        "import multiprocessing, os, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from edgekd.export.stage import _quiet_child\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'), initializer=_quiet_child,\n"
        f"                               initargs=({str(tmp_path / 'child.log')!r}, os.getpid()))\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 600)\n"
        "    time.sleep(600)\n"
    )
    (tmp_path / "parent.py").write_text(code)
    parent = subprocess.Popen([sys.executable, "parent.py"], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists():
        time.sleep(0.1)
    stat = Path(f"/proc/{child}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", "the export child outlived its run"


# -- data is validated like the recipe ------------------------------------------------------------------
def _npz_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    import numpy as np

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((60, 1, 8, 8)).astype(np.float32), np.arange(60) % 3
    cases = {}

    def save(name: str, fragment: str, **arrays) -> None:
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        cases[name] = (path, fragment)

    save("negative label", "label -1", x=x, y=np.where(np.arange(60) == 5, -1, y))
    save("label 1000", "labels go up to 1000", x=x, y=np.where(np.arange(60) == 5, 1000, y))
    save("one class", "has 1 class", x=x, y=np.zeros(60, dtype=np.int64))
    x_nan = x.copy()
    x_nan[7, 0, 2, 2] = np.nan
    save("nan input", "sample", x=x_nan, y=y)
    x_inf = x.copy()
    x_inf[3, 0, 0, 0] = np.inf
    save("inf input", "NaN or infinite", x=x_inf, y=y)
    save("object array", "cannot read", x=np.array([object()] * 60, dtype=object), y=y)
    save("string data", "not numbers", x=np.array(["a"] * 60), y=y)
    (tmp_path / "random.npz").write_bytes(bytes(range(256)) * 8)
    cases["random bytes"] = (tmp_path / "random.npz", "cannot read")
    good = (tmp_path / "one class.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(good[: len(good) // 2])
    cases["truncated zip"] = (tmp_path / "truncated.npz", "cannot read")
    return cases


def test_bad_data_files_are_data_errors(tmp_path):
    from edgekd.data.config import NpzData
    from edgekd.data.registry import load_arrays
    from edgekd.errors import DataError

    for name, (path, fragment) in _npz_cases(tmp_path).items():
        with pytest.raises(DataError) as info:
            load_arrays(NpzData(dataset="npz", path=path))
        assert fragment in info.value.message, (name, info.value.message)
        assert str(path) in info.value.message, name


def test_empty_class_folder_is_refused(tmp_path):
    from PIL import Image

    from edgekd.data.config import ImageFolderData
    from edgekd.data.registry import load_arrays
    from edgekd.errors import DataError

    for cls in ("cat", "dog", "empty"):
        (tmp_path / cls).mkdir()
    for cls in ("cat", "dog"):
        for i in range(3):
            Image.new("L", (8, 8), color=40 * i).save(tmp_path / cls / f"{i}.png")
    with pytest.raises(DataError, match=r"class folder .*empty holds no images"):
        load_arrays(ImageFolderData(dataset="imagefolder", path=tmp_path, image_size=8, channels=1))


def test_bad_data_is_refused_by_validate_at_the_data_line(tmp_path):
    import numpy as np

    np.savez(tmp_path / "d.npz", x=np.ones((40, 1, 8, 8), np.float32), y=np.where(np.arange(40) == 0, -1, np.arange(40) % 2))
    (tmp_path / "r.yaml").write_text("name: x\ndata: {dataset: npz, path: d.npz}\nteacher: {model: mlp, train: {epochs: 1}}\n")
    proc = subprocess.run([sys.executable, "-m", "edgekd", "validate", "r.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    assert "r.yaml:2" in proc.stderr and "label -1" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("suffix", [".onnx", ".ort", ".pte"])
def test_corrupt_artifact_to_benchmark_is_exit_2_naming_the_file(tmp_path, suffix):
    # Random bytes (and, for .pte, bytes without ExecuTorch's identifier: the 1.5.1 loader used to
    # abort the whole process with a C++ terminate) are bad input: exit 2, the file named, no traceback.
    bad = tmp_path / f"model{suffix}"
    bad.write_bytes(os.urandom(5000))
    proc = subprocess.run([sys.executable, "-m", "edgekd", "benchmark", bad.name, "--threads", "1",
                           "--batch-size", "1", "--out", "b"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"model{suffix}" in proc.stderr and "export it again" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "already exists" not in proc.stderr  # ORT's duplicate-config warning, once printed for .ort


def test_more_calibration_samples_than_the_split_is_refused_by_validate():
    # before, the request failed only when the quantize stage ran, after teacher training and distillation
    from edgekd.errors import RecipeError
    from edgekd.pipeline.validate import validate_document
    from edgekd.recipe.load import load_recipe

    doc = load_recipe(REPO / "recipes" / "quickstart.yaml",
                      ["data.image_size=8", "teacher.kwargs.width=8",
                       "stages.3.quantize.method.calibration.samples=5000"])
    with pytest.raises(RecipeError) as info:
        validate_document(doc)
    assert info.value.key == "stages.3.quantize.method.calibration.samples" and info.value.line is not None
    assert "the training split holds 1" in info.value.message and "at most" in info.value.hint
