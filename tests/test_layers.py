"""The layers contract (pyproject.toml, ``[tool.importlinter]``): every package imports only from the
layers below it, whether the import is at module level or inside a function (issue 15).

import-linter (https://import-linter.readthedocs.io) checks the contract; these tests make it part of
the default run, and make sure no package of edgekd escapes it by not being named in any layer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _layer_modules() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return {name.strip() for layer in contract["layers"] for name in layer.replace(":", "|").split("|")}


def test_the_layers_contract_holds():
    # the command line, as a developer runs it: it configures import-linter and reads pyproject.toml
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_every_package_of_edgekd_is_in_a_layer():
    graph = grimp.build_graph("edgekd", cache_dir=None)
    top_level = {m for m in graph.find_children("edgekd")}
    assert top_level - _layer_modules() == set(), "name the new package in a layer of [tool.importlinter]"
    assert _layer_modules() - top_level == set(), "a layer names a package edgekd no longer has"


def test_the_contract_catches_an_import_running_back_up():
    """A lower layer importing a higher one (models -> pipeline) is reported: the contract is not vacuous."""
    from importlinter.application.app_config import settings  # noqa: F401  (configures import-linter)
    from importlinter.contracts.layers import LayersContract
    from importlinter.domain.contract import ContractCheck  # noqa: F401

    graph = grimp.build_graph("edgekd", cache_dir=None)
    graph.add_import(importer="edgekd.models.spec", imported="edgekd.pipeline.runner", line_number=1,
                     line_contents="from edgekd.pipeline.runner import Runner")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (options,) = [c for c in config["contracts"] if c["type"] == "layers"]
    contract = LayersContract(name="probe", session_options={"root_packages": ["edgekd"]},
                              contract_options={"layers": options["layers"], "containers": []})
    check = contract.check(graph, verbose=False)
    assert not check.kept
    assert "edgekd.models" in str(check.metadata) and "edgekd.pipeline" in str(check.metadata)
