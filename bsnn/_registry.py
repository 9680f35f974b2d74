"""A tiny name -> object registry that fails loudly with the valid names."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from bsnn.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps lower-case names to objects (classes or factory functions).

    Args:
        kind: what the registry holds, used in error messages (e.g. ``"dataset"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (lower-cased); duplicate names are an error."""
        key = name.lower()

        def deco(obj: T) -> T:
            if key in self._items:
                raise ConfigError(f"{self.kind} {key!r} is already registered")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the object registered as ``name``; unknown names raise listing the valid ones."""
        key = str(name).lower()
        if key not in self._items:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}"
            )
        return self._items[key]

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return str(name).lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
