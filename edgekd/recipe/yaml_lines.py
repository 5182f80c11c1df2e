"""YAML with line numbers, parsed with the safe loader (no tags that construct Python objects).

We compose the node tree with ``yaml.SafeLoader`` (the same constructor ``yaml.safe_load`` uses)
and walk it once to map every key path to its line, so errors can point at the exact line.
"""

from __future__ import annotations

from typing import Any

import yaml

from edgekd.errors import RecipeError

Path_ = tuple[str | int, ...]


def _walk(node: yaml.Node, path: Path_, lines: dict[Path_, int], file: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                dotted = ".".join(str(p) for p in (*path, key))
                raise RecipeError(f"duplicate key (first given on line {seen[key]})", file=file, line=line,
                                  key=dotted)
            seen[key] = line
            lines[(*path, key)] = line
            _walk(value_node, (*path, key), lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _walk(item, (*path, i), lines, file)


def load_yaml_with_lines(text: str, file: str) -> tuple[Any, dict[Path_, int]]:
    """Return (data, {key path: 1-based line})."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        lines: dict[Path_, int] = {(): node.start_mark.line + 1}
        _walk(node, (), lines, file)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise RecipeError(f"invalid YAML: {exc.problem or exc}", file=file, line=line,
                          hint="check indentation and that every 'key: value' has a space after the colon") from exc
    except yaml.YAMLError as exc:  # e.g. a python/object tag rejected by the safe constructor
        raise RecipeError(f"invalid YAML: {exc}", file=file) from exc
    finally:
        loader.dispose()
    return data, lines
