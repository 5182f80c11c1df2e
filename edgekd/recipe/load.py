"""Load a recipe file: YAML (safe) → overrides → pydantic, with errors that point at a line."""

from __future__ import annotations

import difflib
import hashlib
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from edgekd.errors import RecipeError
from edgekd.recipe.overrides import apply_override, parse_override
from edgekd.recipe.schema import Recipe
from edgekd.recipe.yaml_lines import decode_recipe, load_yaml_with_lines

PathT = tuple[str | int, ...]


def _data_path(loc: tuple, data: Any) -> PathT:
    """Map a pydantic error location onto the YAML document, dropping union tags and the like."""
    path: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and part in node:
            path.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            path.append(part)
            node = node[part]
        elif last and isinstance(node, dict) and isinstance(part, str):
            path.append(part)  # a missing key: name it
        elif not isinstance(node, (dict, list)):
            break  # inside a scalar: the rest are union member names
    return tuple(path)


def _unwrap(annotation: Any) -> list[Any]:
    """All classes an annotation may hold (through Optional, unions, lists, Annotated)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list, tuple, dict):
        out = []
        for arg in typing.get_args(annotation):
            out.extend(_unwrap(arg))
        return out
    return [annotation]


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at ``loc`` (to list valid keys)."""
    current: list[Any] = [Recipe]
    for part in loc:
        models = [c for c in current if isinstance(c, type) and issubclass(c, BaseModel)]
        if isinstance(part, int):
            continue
        nxt: list[Any] = []
        for model in models:
            field = model.model_fields.get(part)
            if field is None:
                alias = next((f for f in model.model_fields.values() if f.alias == part), None)
                field = alias
            if field is not None:
                nxt.extend(_unwrap(field.annotation))
            else:  # a union tag: keep the members whose discriminator literal matches
                for f in model.model_fields.values():
                    if typing.get_origin(f.annotation) is typing.Literal and part in typing.get_args(f.annotation):
                        nxt.append(model)
        if not nxt:
            return None
        current = nxt
    models = [c for c in current if isinstance(c, type) and issubclass(c, BaseModel)]
    return models[0] if models else None


def _valid_keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _format_error(err: dict, data: Any, lines: dict, file: str, overridden: set[PathT]) -> RecipeError:
    loc = tuple(err["loc"])
    path = _data_path(loc, data)
    if err["type"] == "union_tag_invalid":  # point at the discriminator's own line
        path = (*path, str(err.get("ctx", {}).get("discriminator", "")).strip("'"))
    dotted = ".".join(str(p) for p in path) or "(top level)"
    line = None
    for n in range(len(path), -1, -1):
        if path[:n] in lines:
            line = lines[path[:n]]
            break
    kind = err["type"]
    hint = None
    if kind == "extra_forbidden":
        owner = _model_at(loc[:-1])
        valid = _valid_keys(owner) if owner else []
        key = str(loc[-1])
        close = difflib.get_close_matches(key, valid, n=2, cutoff=0.5)
        message = f"unknown key {key!r}"
        hint = (f"did you mean {' or '.join(repr(c) for c in close)}? " if close else "") + \
            (f"valid keys here: {', '.join(valid)}" if valid else "")
    elif kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        tags = [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",")]
        close = difflib.get_close_matches(str(ctx.get("tag")), tags, n=2, cutoff=0.5)
        message = f"unknown {ctx.get('discriminator', 'choice').strip(chr(39))} {ctx.get('tag')!r}"
        hint = (f"did you mean {' or '.join(repr(c) for c in close)}? " if close else "") + \
            f"valid choices: {', '.join(tags)}"
    elif kind == "missing":
        message = "required key is missing"
        owner = _model_at(loc[:-1])
        if owner is not None:
            field = owner.model_fields.get(str(loc[-1]))
            if field is not None and field.description:
                hint = field.description
    elif kind == "literal_error":
        message = err["msg"]
        given = err.get("input")
        expected = str(err.get("ctx", {}).get("expected", ""))
        choices = [c.strip(" '") for c in expected.replace(" or ", ",").split(",") if c.strip()]
        close = difflib.get_close_matches(str(given), choices, n=2, cutoff=0.5)
        if close:
            hint = f"did you mean {' or '.join(repr(c) for c in close)}?"
    else:
        message = err["msg"].removeprefix("Value error, ")
    if path in overridden or any(path[: len(o)] == o for o in overridden):
        message += " (value from --set)"
    return RecipeError(message, file=file, line=line, key=dotted, hint=hint)


@dataclass
class RecipeDocument:
    """A validated recipe with where it came from, so later checks can still name a line."""

    recipe: Recipe
    file: str
    text: str
    lines: dict[PathT, int]

    def line_of(self, dotted: str) -> int | None:
        path = tuple(int(p) if p.isdigit() else p for p in dotted.split("."))
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]]
        return None

    def error_at(self, dotted: str, message: str, hint: str | None = None) -> RecipeError:
        return RecipeError(message, file=self.file, line=self.line_of(dotted), key=dotted, hint=hint)


def parse_recipe(text: str, file: str, overrides: list[str] | None = None, *,
                 context: dict[str, Any] | None = None,
                 adjust: Callable[[dict], None] | None = None) -> RecipeDocument:
    """Parse and validate recipe YAML ``text`` (``file`` names it in errors). ``context``: pydantic
    validation context (``{"teacher_given": True}`` when a teacher module comes from Python);
    ``adjust``: edits the parsed mapping before overrides and validation (see ``parse_recipe_data``)."""
    data, lines = load_yaml_with_lines(text, file)
    if data is None:
        raise RecipeError("the recipe is empty (no sections, only blank lines or comments)", file=file, line=1,
                          hint="a recipe needs at least name, data and teacher: start from recipes/quickstart.yaml")
    return parse_recipe_data(data, file, lines, overrides, text=text, context=context, adjust=adjust)


def parse_recipe_data(data: Any, file: str, lines: dict[PathT, int] | None = None,
                      overrides: list[str] | None = None, *, text: str = "",
                      context: dict[str, Any] | None = None,
                      adjust: Callable[[dict], None] | None = None) -> RecipeDocument:
    """Validate an already parsed recipe (a dict, as from YAML or a Python caller) after ``adjust`` (the
    Python API's edits for a teacher module or in-memory data) and ``overrides`` ("dotted.key=value").
    Raises ``RecipeError`` at the first invalid key (its line when ``lines`` knows it), never a pydantic
    ``ValidationError``."""
    lines = lines or {}
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a mapping of sections (name, data, teacher, stages, ...)", file=file, line=1)
    if adjust is not None:
        adjust(data)
    overridden: set[PathT] = set()
    for text_override in overrides or []:
        path, value = parse_override(text_override)
        apply_override(data, path, value, text_override)
        overridden.add(tuple(path))
    try:
        recipe = Recipe.model_validate(data, context=context)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # Report the first error in document order; the rest are listed after it.
        formatted = [_format_error(e, data, lines, file, overridden) for e in errors]
        formatted.sort(key=lambda e: e.line or 0)
        first = formatted[0]
        if len(formatted) > 1:
            more = "\n".join(f"  also {e.message}" + (f"\n    hint: {e.hint}" if e.hint else "") for e in formatted[1:6])
            first.message += f"\n{more}"
        raise first from exc
    return RecipeDocument(recipe=recipe, file=file, text=text, lines=lines)


def load_recipe(path: Path | str, overrides: list[str] | None = None, *,
                context: dict[str, Any] | None = None,
                adjust: Callable[[dict], None] | None = None) -> RecipeDocument:
    """Read, parse and validate a recipe file; relative paths in it are made relative to its folder."""
    path = Path(path)
    if path.is_dir():  # say what it is: "does not exist" for a folder that plainly exists misleads
        yamls = sorted(p.name for p in path.glob("*.y*ml"))[:5]
        raise RecipeError(f"{path} is a folder, not a recipe file", file=str(path),
                          hint=f"name a YAML file in it ({', '.join(yamls)})" if yamls else "name a recipe YAML file")
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist", file=str(path))
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe: {exc.strerror}", file=str(path)) from exc
    doc = parse_recipe(decode_recipe(raw, str(path)), str(path), overrides, context=context,
                       adjust=adjust)
    doc.recipe = _resolve_relative_paths(doc.recipe, path.parent)
    return doc


def _resolve_relative_paths(recipe: Recipe, base: Path) -> Recipe:
    """Paths in a recipe are relative to the recipe file, not to the current directory."""
    from edgekd.data.sources import resolve_path

    recipe.data = resolve_path(recipe.data, base)
    if recipe.teacher.checkpoint is not None and not recipe.teacher.checkpoint.is_absolute():
        recipe.teacher.checkpoint = base / recipe.teacher.checkpoint
    return recipe


def recipe_hash(recipe: Recipe) -> str:
    canonical = json.dumps(recipe.model_dump(mode="json", by_alias=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
