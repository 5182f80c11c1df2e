"""``--set dotted.key=value`` overrides, applied to the parsed YAML before validation."""

from __future__ import annotations

from typing import Any

import yaml

from edgekd.errors import ConfigError
from edgekd.recipe.yaml_lines import load_scalar_yaml


def parse_override(text: str) -> tuple[list[str | int], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value",
                          hint="for example --set teacher.train.epochs=2")
    try:
        value = load_scalar_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({problem})",
                          hint="quote a value with special characters: --set 'name=\"my: run\"'") from exc
    path: list[str | int] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    return path, value


def apply_override(data: dict, path: list[str | int], value: Any, text: str) -> None:
    node: Any = data
    for depth, part in enumerate(path[:-1]):
        where = ".".join(str(p) for p in path[: depth + 1])
        if isinstance(node, list):
            if not isinstance(part, int) or not -len(node) <= part < len(node):
                raise ConfigError(f"override {text!r}: {where} is not an index of a {len(node)}-item list")
            node = node[part]
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"override {text!r}: {where} is a value, not a section")
    last = path[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or not -len(node) <= last < len(node):
            raise ConfigError(f"override {text!r}: index {last} is outside a {len(node)}-item list")
        node[last] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {text!r}: cannot set a key inside a value")
