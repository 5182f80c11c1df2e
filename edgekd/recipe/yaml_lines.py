"""YAML with line numbers, parsed with the safe loader (no tags that construct Python objects).

We compose the node tree with ``yaml.SafeLoader`` (the same constructor ``yaml.safe_load`` uses)
and walk it once to map every key path to its line, so errors can point at the exact line.

A recipe is untrusted input, so the text is bounded before anything is built from it: its size
(``MAX_RECIPE_BYTES``), its encoding (UTF-8, errors name the byte offset and line), its nesting
depth (``MAX_DEPTH``), and the number of values it expands to once aliases are followed
(``MAX_VALUES``: nine levels of nine aliases is 2 KB of text but 387 million values, the "billion
laughs" attack). Keys must be scalars. Every failure is a ``RecipeError``.

Plain scalars resolve by YAML 1.2's core schema, not PyYAML's YAML 1.1 one: ``yes``/``no``/``on``/
``off`` stay strings and ``1:30`` is not the base-60 number 90, so such a value fails validation at
its key instead of being read as something the user did not write.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from edgekd.errors import RecipeError

Path_ = tuple[str | int, ...]

#: a recipe is a few KB; anything near this is not a recipe
MAX_RECIPE_BYTES = 1 << 20
#: sections inside sections: real recipes nest 4-5 deep
MAX_DEPTH = 32
#: scalars, lists and mappings after alias expansion
MAX_VALUES = 100_000


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose implicit bool/int/float resolution follows YAML 1.2's core schema."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:int",
                                   re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                   list("-+0123456789"))
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"))


def load_scalar_yaml(text: str) -> Any:
    """Parse a short YAML value (a ``--set`` override) with the recipe's resolution rules."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - RecipeLoader is a SafeLoader


def decode_recipe(raw: bytes, file: str) -> str:
    """The recipe's text from its bytes: UTF-8 (an optional BOM is dropped), at most ``MAX_RECIPE_BYTES``."""
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"file is {len(raw):,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,}", file=file,
                          hint="is this the right file? recipes are short YAML documents")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise RecipeError("file is UTF-16 text; recipes are UTF-8", file=file, line=1,
                          hint="save the file as UTF-8 (for example: iconv -f UTF-16 -t UTF-8)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipeError(f"byte 0x{raw[exc.start]:02x} at offset {exc.start} is not UTF-8 text", file=file,
                          line=line, hint="save the file as UTF-8 (a Latin-1 or binary byte is in it)") from None


def _kind(node: yaml.Node) -> str:
    return "a list" if isinstance(node, yaml.SequenceNode) else "a mapping" if isinstance(node, yaml.MappingNode) \
        else "a value"


class _Walker:
    """One pass over the composed nodes: key lines, duplicate and non-scalar keys, depth, expanded size."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[Path_, int] = {}
        self.sizes: dict[int, int] = {}  # id(node) -> values it expands to (aliases share node objects)

    def walk(self, node: yaml.Node, path: Path_, depth: int = 0) -> int:
        """Record lines under ``node``; return how many values it expands to."""
        if depth > MAX_DEPTH:
            raise RecipeError(f"nested more than {MAX_DEPTH} levels deep", file=self.file,
                              line=node.start_mark.line + 1, key=".".join(str(p) for p in path) or None,
                              hint="a recipe's sections nest a few levels; check the brackets and indentation")
        if id(node) in self.sizes:  # an alias of a node already walked: count it, do not walk it again
            size = self.sizes[id(node)]
        else:
            size = 1
            if isinstance(node, yaml.MappingNode):
                size += self._mapping(node, path, depth)
            elif isinstance(node, yaml.SequenceNode):
                for i, item in enumerate(node.value):
                    self.lines.setdefault((*path, i), item.start_mark.line + 1)
                    size += self.walk(item, (*path, i), depth + 1)
            self.sizes[id(node)] = size
        if size > MAX_VALUES:
            raise RecipeError(f"the document expands to more than {MAX_VALUES:,} values once its aliases are "
                              "followed", file=self.file, line=node.start_mark.line + 1,
                              hint="remove the YAML anchors (&) and aliases (*) and write the values out")
        return size

    def _mapping(self, node: yaml.MappingNode, path: Path_, depth: int) -> int:
        size = 0
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise RecipeError(f"a key must be a plain name, not {_kind(key_node)}", file=self.file, line=line,
                                  key=".".join(str(p) for p in path) or None,
                                  hint="write 'name: value'; '? [a, b]' and '{a: 1}: x' are not recipe keys")
            key = key_node.value
            if key in seen:
                dotted = ".".join(str(p) for p in (*path, key))
                raise RecipeError(f"duplicate key (first given on line {seen[key]})", file=self.file, line=line,
                                  key=dotted)
            seen[key] = line
            self.lines.setdefault((*path, key), line)
            size += 1 + self.walk(value_node, (*path, key), depth + 1)
        return size


def _first_deep_line(text: str) -> int | None:
    """The line where flow brackets first nest deeper than ``MAX_DEPTH`` (comments and quoted text
    skipped), or None."""
    depth = 0
    for number, line in enumerate(text.splitlines(), start=1):
        quote = None
        for i, char in enumerate(line):
            if quote:
                quote = None if char == quote else quote
            elif char in "'\"":
                quote = char
            elif char == "#" and (i == 0 or line[i - 1] in " \t"):
                break
            else:
                depth += (char in "[{") - (char in "]}")
                if depth > MAX_DEPTH:
                    return number
    return None


def _reader_error_line(text: str, exc: yaml.reader.ReaderError) -> int:
    return text[: exc.position].count("\n") + 1


def load_yaml_with_lines(text: str, file: str) -> tuple[Any, dict[Path_, int]]:
    """Return (data, {key path: 1-based line}); every problem is a ``RecipeError`` naming a line."""
    deep = _first_deep_line(text)
    if deep is not None:  # refuse before the parser recurses once per level (seconds for thousands)
        raise RecipeError(f"brackets nest more than {MAX_DEPTH} levels deep", file=file, line=deep,
                          hint="check the brackets: a recipe's values nest a few levels")
    loader = None
    try:
        loader = RecipeLoader(text)  # its reader checks every character here
        node = loader.get_single_node()
        if node is None:
            return None, {}
        walker = _Walker(file)
        walker.lines[()] = node.start_mark.line + 1
        walker.walk(node, ())
        data = loader.construct_document(node)
    except yaml.reader.ReaderError as exc:  # a NUL or other control character
        raise RecipeError(f"character {exc.character!r} cannot appear in a recipe", file=file,
                          line=_reader_error_line(text, exc),
                          hint="remove the control character (only tab, newline and printable text are allowed)"
                          ) from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise RecipeError(f"invalid YAML: {exc.problem or exc}", file=file, line=line,
                          hint="check indentation and that every 'key: value' has a space after the colon") from exc
    except yaml.YAMLError as exc:  # e.g. a python/object tag rejected by the safe constructor
        raise RecipeError(f"invalid YAML: {exc}".splitlines()[0], file=file) from exc
    except RecursionError:  # the parser itself recurses once per nesting level
        raise RecipeError(f"nested too deeply to parse (a recipe nests a few levels; at most {MAX_DEPTH})",
                          file=file, hint="check the brackets and indentation") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, walker.lines
