"""Recipe errors name the file, line and dotted key, with valid choices; the CLI exits 2 with no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgekd.errors import ConfigError, RecipeError
from edgekd.recipe.load import load_recipe, parse_recipe

GOOD = textwrap.dedent("""\
    name: t
    seed: 1
    data:
      dataset: digits
      image_size: 16
    teacher:
      model: resnet20
      train:
        epochs: 1
    """)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path: Path, text: str, overrides=None) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text), overrides)
    return info.value


def test_good_recipe_parses(tmp_path):
    doc = load_recipe(write(tmp_path, GOOD))
    assert doc.recipe.data.image_size == 16
    assert doc.recipe.teacher.model == "resnet20"
    assert doc.recipe.student.from_ == "teacher"


def test_unknown_key_names_file_line_key_and_valid_keys(tmp_path):
    err = error_of(tmp_path, GOOD.replace("  image_size: 16", "  image_size: 16\n  imag_size: 8"))
    assert err.line == 6 and err.key == "data.imag_size" and err.file.endswith("recipe.yaml")
    assert "unknown key 'imag_size'" in str(err)
    assert "did you mean 'image_size'" in err.hint and "batch_size" in err.hint


def test_wrong_type_names_line(tmp_path):
    err = error_of(tmp_path, GOOD.replace("epochs: 1", "epochs: many"))
    assert err.line == 9 and err.key == "teacher.train.epochs"


def test_bad_choice_lists_valid_choices(tmp_path):
    err = error_of(tmp_path, GOOD.replace("dataset: digits", "dataset: digitz"))
    assert err.line == 4 and err.key == "data.dataset"
    assert "did you mean 'digits'" in err.hint and "mnist1d" in err.hint


def test_unknown_model_suggests_close_name(tmp_path):
    err = error_of(tmp_path, GOOD.replace("model: resnet20", "model: resnet21"))
    assert err.line == 7 and err.key == "teacher.model"
    assert "resnet20" in str(err)


def test_missing_section(tmp_path):
    err = error_of(tmp_path, "name: t\ndata: {dataset: digits}\n")
    assert err.key == "teacher" and "missing" in str(err)


def test_missing_data_file(tmp_path):
    from edgekd.pipeline.validate import validate_document

    doc = load_recipe(write(tmp_path, GOOD.replace("dataset: digits\n  image_size: 16", "dataset: npz\n  path: nope.npz")))
    with pytest.raises(RecipeError) as info:
        validate_document(doc)
    assert "nope.npz" in str(info.value) and info.value.line == 3


def test_yaml_syntax_error_has_line(tmp_path):
    err = error_of(tmp_path, GOOD.replace("  epochs: 1", "  epochs: [1"))
    assert err.line is not None and "invalid YAML" in str(err)


def test_python_tags_are_not_executed(tmp_path):
    err = error_of(tmp_path, GOOD + "extra: !!python/object/apply:os.system ['echo pwned']\n")
    assert "invalid YAML" in str(err)


def test_duplicate_key_is_an_error(tmp_path):
    err = error_of(tmp_path, GOOD + "seed: 2\n")
    assert err.key == "seed" and err.line == 10 and "duplicate" in str(err)


def test_overrides_apply_and_type_check(tmp_path):
    path = write(tmp_path, GOOD)
    doc = load_recipe(path, ["teacher.train.epochs=3", "data.image_size=8"])
    assert doc.recipe.teacher.train.epochs == 3 and doc.recipe.data.image_size == 8
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["teacher.train.epochs=-1"])
    assert "from --set" in str(info.value) and info.value.key == "teacher.train.epochs"
    with pytest.raises(ConfigError):
        load_recipe(path, ["noequals"])


def test_checkpoint_xor_train(tmp_path):
    err = error_of(tmp_path, GOOD.replace("  train:\n    epochs: 1\n", ""))
    assert err.key == "teacher" and "checkpoint" in str(err)


def test_unknown_stage_lists_stages(tmp_path):
    err = error_of(tmp_path, GOOD + "stages:\n  - prnue: {}\n")
    assert err.line == 11 and err.key == "stages.0.prnue" and "valid keys here" in err.hint


def test_parse_recipe_without_file():
    doc = parse_recipe(GOOD, "<string>")
    assert doc.line_of("teacher.train.epochs") == 9


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgekd", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_cli_unknown_key_exits_2_without_traceback(tmp_path):
    path = write(tmp_path, GOOD.replace("seed: 1", "seed: 1\nsede: 2"))
    proc = _cli("validate", str(path))
    assert proc.returncode == 2
    assert f"{path}:3: sede: unknown key 'sede'" in proc.stderr
    assert "Traceback" not in proc.stderr
    debug = _cli("--debug", "validate", str(path))
    assert "Traceback" in debug.stderr


def test_cli_validate_ok_and_schema(tmp_path):
    proc = _cli("validate", str(write(tmp_path, GOOD)))
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout
    schema = json.loads(_cli("schema").stdout)
    assert "teacher" in schema["properties"] and "stages" in schema["properties"]


def test_every_example_recipe_validates():
    root = Path(__file__).resolve().parents[1] / "recipes"
    from edgekd.pipeline.validate import validate_document

    recipes = sorted(root.glob("*.yaml"))
    assert recipes
    for path in recipes:
        validate_document(load_recipe(path))


def test_a_folder_or_a_missing_path_as_the_recipe_says_which(tmp_path):
    (tmp_path / "mine.yaml").write_text("name: x\n")
    with pytest.raises(RecipeError, match="is a folder, not a recipe file") as info:
        load_recipe(tmp_path)
    assert "mine.yaml" in info.value.hint  # the files it could have meant
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "absent.yaml")
