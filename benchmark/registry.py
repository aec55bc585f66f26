"""A small generic registry: decorator registration for built-ins, entry points for plugins.

Modelled on timm's ``_registry.py``: built-ins register with a decorator in a fixed order,
third-party classes are discovered lazily through ``importlib.metadata`` entry points, and
names can be selected with ``all``, comma lists or shell wildcards (``'tr*'``).
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib.metadata
import logging
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

from benchmark.errors import UsageError

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class Entry:
    """Where a registered name comes from (shown by ``advbench list``)."""

    name: str
    source: str  # "built-in" or the plugin's distribution name
    obj: type | None
    error: str = ""  # non-empty for a plugin that failed to load


class Registry(Generic[T]):
    """Name → class table for one kind of component.

    Args:
        kind: human name of the component kind ("defense", "attack").
        group: entry-point group searched for third-party plugins.
        base: every registered class must subclass this.
    """

    def __init__(self, kind: str, group: str, base: type) -> None:
        self.kind = kind
        self.group = group
        self.base = base
        self._entries: dict[str, Entry] = {}
        self._plugins_loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator registering a built-in under ``name`` (sets ``cls.name``)."""

        def deco(cls: T) -> T:
            self._add(name, cls, "built-in")
            return cls

        return deco

    def _add(self, name: str, cls: type, source: str) -> None:
        if not isinstance(cls, type) or not issubclass(cls, self.base):
            raise TypeError(f"{self.kind} {name!r} from {source} is not a subclass of "
                            f"{self.base.__name__}")
        if name in self._entries and self._entries[name].obj is not cls:
            raise ValueError(f"duplicate {self.kind} name {name!r} (already registered from "
                             f"{self._entries[name].source}, now from {source})")
        cls.name = name  # type: ignore[attr-defined]
        self._entries[name] = Entry(name, source, cls)

    def _load_entry_points(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in importlib.metadata.entry_points(group=self.group):
            dist = getattr(getattr(ep, "dist", None), "name", None) or ep.value
            if ep.name in self._entries and self._entries[ep.name].source == "built-in":
                raise ValueError(f"plugin {self.kind} {ep.name!r} from {dist} collides with a "
                                 f"built-in {self.kind} of the same name")
            try:
                obj = ep.load()
                self._add(ep.name, obj, dist)
            except ValueError:
                raise
            except Exception as exc:  # a broken plugin must not break the harness
                logger.warning("skipping broken %s plugin %r from %s: %s", self.kind, ep.name,
                               dist, exc)
                self._entries[ep.name] = Entry(ep.name, dist, None, f"{type(exc).__name__}: {exc}")

    def entries(self) -> list[Entry]:
        """All entries, built-ins in registration order, then plugins (broken ones included)."""
        self._load_entry_points()
        return list(self._entries.values())

    def names(self, pattern: str = "*") -> list[str]:
        """Usable names matching a shell wildcard, in registration order."""
        return [e.name for e in self.entries()
                if e.obj is not None and fnmatch.fnmatchcase(e.name, pattern)]

    def get(self, name: str) -> T:
        """The class registered as ``name``.

        Raises:
            UsageError: unknown or broken name; the message lists the valid names.
        """
        self._load_entry_points()
        entry = self._entries.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, self.names(), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UsageError(f"unknown {self.kind} {name!r}{hint}; valid: {', '.join(self.names())}")
        if entry.obj is None:
            raise UsageError(f"{self.kind} plugin {name!r} from {entry.source} failed to load: "
                             f"{entry.error}")
        return entry.obj  # type: ignore[return-value]

    def source(self, name: str) -> str:
        """Where ``name`` comes from: ``built-in`` or the plugin's distribution ('' if
        unknown)."""
        self._load_entry_points()
        entry = self._entries.get(name)
        return entry.source if entry is not None else ""

    def resolve(self, spec: str) -> list[str]:
        """Expand ``all`` / ``a,b`` / wildcards into names, keeping registry order.

        Raises:
            UsageError: a plain name is unknown or a wildcard matches nothing.
        """
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        if not parts:
            raise UsageError(f"empty {self.kind} list")
        chosen: set[str] = set()
        for part in parts:
            if part == "all":
                chosen.update(self.names())
            elif any(c in part for c in "*?["):
                hits = self.names(part)
                if not hits:
                    raise UsageError(f"{self.kind} pattern {part!r} matches nothing; valid: "
                                     f"{', '.join(self.names())}")
                chosen.update(hits)
            else:
                self.get(part)
                chosen.add(part)
        return [n for n in self.names() if n in chosen]

    def __contains__(self, name: str) -> bool:
        return name in self.names()
