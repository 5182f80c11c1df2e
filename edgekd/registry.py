"""One generic registry for every kind of pluggable component (runtimes, export formats, losses, ...).

A registry maps a name, as a recipe writes it, to an entry that declares everything the rest of
the code needs about that component. The tables that used to be kept by hand next to each other
(a ``Literal`` of names, a marker per runtime, a library per runtime, an install hint) are derived
from the entries instead, so adding a component is one entry.

This module is ground: it imports nothing from edgekd but ``edgekd.errors``, so any layer may use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, Literal, TypeVar

from edgekd.errors import ConfigError

T = TypeVar("T")


class UnknownNameError(ConfigError, KeyError):
    """A name that no entry of a registry carries (exit code 2). Also a ``KeyError``, so a registry
    behaves as a ``Mapping`` (``in``, ``.get``) while a direct lookup gives the user the valid names."""

    __str__ = ConfigError.__str__  # KeyError's would quote the whole message


def _name_of(entry: Any) -> str:
    return entry.name


class Registry(Mapping[str, T], Generic[T]):
    """Entries of one ``kind`` (a word for messages: "runtime", "export format"), in registration order.

    ``registry[name]`` returns the entry or raises ``UnknownNameError`` naming the valid names;
    iterating gives the names, ``.values()`` the entries. ``key`` reads an entry's name (its
    ``name`` attribute by default). Registering a name twice is a programming error (``ValueError``):
    a second runtime for a format must be a second name, never a silent replacement.
    """

    def __init__(self, kind: str, entries: Iterable[T] = (), *, key: Callable[[T], str] = _name_of) -> None:
        self.kind = kind
        self._key = key
        self._entries: dict[str, T] = {}
        for entry in entries:
            self.add(entry)

    def add(self, entry: T) -> T:
        """Register ``entry`` under its name; returns it (so it also works as a class decorator)."""
        name = self._key(entry)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty string name, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(f"unknown {self.kind} {name!r}", hint=self.valid_hint()) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def valid_hint(self) -> str:
        return f"valid {self.kind}s: {', '.join(self._entries)}"

    def literal(self) -> Any:
        """A ``Literal[...]`` of the names, for pydantic fields: validation errors list every valid
        name and the JSON Schema gets an ``enum``. Built when called, so call it after registering."""
        if not self._entries:
            raise ValueError(f"no {self.kind} is registered")
        return Literal[self.names()]  # Literal flattens the tuple: Literal["a", "b"]
