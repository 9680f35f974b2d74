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
        self._namespaces: dict[str, tuple[Callable[[str], T], Callable[[], list[str]]]] = {}

    def register_namespace(self, prefix: str, resolve: Callable[[str], T], names: Callable[[], list[str]]) -> None:
        """Entries ``"<prefix>:<name>"`` provided by another library, looked up only when asked for.

        Args:
            prefix: the namespace (lower-cased), e.g. ``"torchvision"``.
            resolve: ``name -> object`` for a name in ``names()``.
            names: the names the namespace offers (called only to check a name or to list them).
        """
        key = prefix.lower()
        if key in self._namespaces:
            raise ConfigError(f"{self.kind} namespace {key!r} is already registered")
        self._namespaces[key] = (resolve, names)

    def _namespaced(self, key: str) -> tuple[str, str] | None:
        prefix, sep, name = key.partition(":")
        return (prefix, name) if sep and prefix in self._namespaces else None

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
        spaced = self._namespaced(key)
        if spaced is not None:
            resolve, names = self._namespaces[spaced[0]]
            offered = names()
            match = next((n for n in offered if n.lower() == spaced[1]), None)
            if match is None:
                raise ConfigError(f"unknown {self.kind} {name!r}; {spaced[0]} offers: {', '.join(offered)}")
            return resolve(match)
        if key not in self._items:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}"
                + "".join(f", {p}:<name>" for p in sorted(self._namespaces))
            )
        return self._items[key]

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        key = str(name).lower()
        spaced = self._namespaced(key)
        if spaced is not None:
            return any(n.lower() == spaced[1] for n in self._namespaces[spaced[0]][1]())
        return key in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
