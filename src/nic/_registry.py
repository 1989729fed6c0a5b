"""A registry of named things: the one shape behind nic's encoders, encoder spec kinds and slide models.

A :class:`Registry` maps names to values (builders, loaders, classes) in the order they
were registered.  Registering a name twice is an error unless it is the same value again
(a module imported twice); asking for an unknown name is a one-line error that lists the
registered names, so neither messages nor command-line help carry a hand-written list.
Importing this module imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from nic.errors import NicError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> values of one kind.

    ``kind`` names what is registered in messages (``"encoder"``, ``"slide model"``);
    ``error`` is the :class:`~nic.errors.NicError` subclass raised for an unknown or
    duplicate name; ``param``, when given, is the parameter a user names an entry with,
    and an unknown name is then reported as `` `param` must be one of ... `` (the command
    line turns `` `param` `` into its flag).
    """

    def __init__(self, kind: str, error: type[NicError] = NicError, param: str | None = None) -> None:
        self.kind = kind
        self.error = error
        self.param = param
        self._items: dict[str, T] = {}

    def register(self, name: str, value: T) -> T:
        """Add ``value`` under ``name`` and return it; a name taken by another value is an error."""
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        old = self._items.get(name)
        if old is not None and old is not value and old != value:  # the same entry again: a module imported twice
            raise self.error(f"{self.kind} name {name!r} is already registered; pick another name")
        self._items[name] = value
        return value

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@registry.decorator(name)``: register the decorated function or class under ``name``."""

        def deco(value: T) -> T:
            return self.register(name, value)

        return deco

    def unregister(self, name: str) -> None:
        """Remove ``name`` if present (for plug-ins that replace an entry, and tests)."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        """The value of ``name``; an unknown name raises ``error`` listing the registered names."""
        try:
            return self._items[name]
        except KeyError:
            raise self.error(self.unknown(name)) from None

    def unknown(self, name: str, hint: str = "") -> str:
        """The one-line message for an unknown ``name``, with an optional ``hint`` appended."""
        choices = ", ".join(self.names())
        if self.param:
            text = f"`{self.param}` must be one of {choices} (got {name!r})"
        else:
            text = f"unknown {self.kind} {name!r}; registered: {choices}"
        return f"{text}{hint}"

    def names(self) -> list[str]:
        """Registered names, sorted (for listings, help and messages)."""
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """(name, value) pairs in registration order (for dispatch where order matters)."""
        return list(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
