"""Mutations of the example recipes that a recipe loader must refuse with a located error.

Shared by ``tests/test_fuzz_recipes.py`` (hypothesis, bounded) and ``tools/fuzz_recipes.py`` (long
runs with counts by outcome). Every mutation here makes the recipe invalid by construction: an
unknown key, a value of the wrong type or out of range, a section of the wrong kind, a duplicate
key, a byte that is not UTF-8 or a control character, or a YAML shape no recipe has (complex keys,
alias bombs, deep nesting, unclosed brackets, tabs).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = [REPO / "recipes" / "quickstart.yaml", REPO / "recipes" / "mnist1d_mlp.yaml"]

Leaf = tuple[tuple[Any, ...], Any]


def leaves(node: Any, path: tuple[Any, ...] = ()) -> list[Leaf]:
    """(path, value) of every scalar in a parsed recipe, outside model ``kwargs`` (free-form by design)."""
    if path and path[-1] == "kwargs":
        return []
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in leaves(v, (*path, k))]
    if isinstance(node, list):
        return [leaf for i, v in enumerate(node) for leaf in leaves(v, (*path, i))]
    return [(path, node)]


def sections(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths of every mapping in a parsed recipe (the top level is ``()``), outside model ``kwargs``."""
    if path and path[-1] == "kwargs":
        return []
    found = [path] if isinstance(node, dict) else []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in children:
        found += sections(value, (*path, key))
    return found


def _set(data: Any, path: tuple[Any, ...], value: Any) -> None:
    for part in path[:-1]:
        data = data[part]
    data[path[-1]] = value


def _get(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        data = data[part]
    return data


def _dump(data: Any) -> bytes:
    return yaml.safe_dump(data, sort_keys=False).encode()


def _wrong_type(data: dict, rng: random.Random) -> bytes:
    path, value = rng.choice(leaves(data))
    if isinstance(value, bool):
        bad: Any = [value]
    elif isinstance(value, (int, float)):
        bad = rng.choice(["lots", [1, 2], {"a": 1}])
    else:
        bad = rng.choice([[value, value], {"value": value}])
    _set(data, path, bad)
    return _dump(data)


def _out_of_range(data: dict, rng: random.Random) -> bytes:
    numeric = [(p, v) for p, v in leaves(data) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    path, _ = rng.choice(numeric)
    _set(data, path, rng.choice([-1, -1e9, float("nan"), float("-inf")]))
    return _dump(data)


def _unknown_key(data: dict, rng: random.Random) -> bytes:
    path = rng.choice(sections(data))
    target = _get(data, path)
    target[rng.choice(["zzz_unknown", "epoch", "learning_rate", "ratio_", "Seed"])] = 1
    return _dump(data)


def _section_kind(data: dict, rng: random.Random) -> bytes:
    path = rng.choice([p for p in sections(data) if p])
    _set(data, path, rng.choice([7, "text", [1, 2, 3]]))
    return _dump(data)


def _text_lines(raw: bytes, rng: random.Random) -> tuple[list[bytes], int]:
    lines = raw.split(b"\n")
    content = [i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith(b"#")]
    return lines, rng.choice(content)


def _bad_byte(raw: bytes, rng: random.Random) -> bytes:
    lines, i = _text_lines(raw, rng)
    lines[i] = lines[i] + rng.choice([b" # caf\xe9", b"\xff", b"\xc3\x28", b"\x00", b"\x07", b"\x1b[31m"])
    return b"\n".join(lines)


def _duplicate_key(raw: bytes, rng: random.Random) -> bytes:
    lines, i = _text_lines(raw, rng)
    line = lines[i]
    if b":" not in line or line.lstrip().startswith(b"-"):
        return raw.replace(b"\nseed:", b"\nseed: 1\nseed:", 1)
    lines.insert(i + 1, line)
    return b"\n".join(lines)


def _yaml_shape(raw: bytes, rng: random.Random) -> bytes:
    lines, i = _text_lines(raw, rng)
    choice = rng.randrange(6)
    if choice == 0:  # a complex key
        lines.insert(i, b"? [a, b]\n: 1")
    elif choice == 1:  # a mapping as a key
        lines.insert(i, b"{a: 1}: 2")
    elif choice == 2:  # an unclosed bracket where the value starts (after a comment it would be harmless)
        key = lines[i].split(b":")[0] if b":" in lines[i] else lines[i][: len(lines[i]) - len(lines[i].lstrip())] + b"-"
        lines[i] = key + (b": [unclosed" if b":" in lines[i] else b" [unclosed")
    elif choice == 3:  # a tab in the indentation
        lines[i] = b"\t" + lines[i]
    elif choice == 4:  # deep nesting
        return raw + b"\nzzz: " + b"[" * 2000 + b"]" * 2000 + b"\n"
    else:  # an alias bomb under the teacher's kwargs
        bomb = b"".join(f"  z{k}: &z{k} [{', '.join(['*z' + str(k - 1)] * 9)}]\n".encode() for k in range(1, 9))
        return raw.replace(b"\nteacher:\n", b"\nteacher:\n  z0: &z0 [x, x, x, x, x, x, x, x, x]\n" + bomb, 1)
    return b"\n".join(lines)


#: name -> (works on the parsed data or on the raw bytes, mutation)
MUTATIONS: dict[str, tuple[str, Callable[..., bytes]]] = {
    "wrong_type": ("data", _wrong_type),
    "out_of_range": ("data", _out_of_range),
    "unknown_key": ("data", _unknown_key),
    "section_kind": ("data", _section_kind),
    "bad_byte": ("raw", _bad_byte),
    "duplicate_key": ("raw", _duplicate_key),
    "yaml_shape": ("raw", _yaml_shape),
}


def mutate(example: Path, kind: str, seed: int) -> bytes:
    """The bytes of ``example`` after one mutation of ``kind`` drawn with ``seed``."""
    rng = random.Random(seed)
    raw = example.read_bytes()
    form, fn = MUTATIONS[kind]
    if form == "raw":
        return fn(raw, rng)
    return fn(copy.deepcopy(yaml.safe_load(raw)), rng)
