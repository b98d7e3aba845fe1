"""The one way into every registry (policies, predictors, schedulers, attention, routers, ...).

A registry is a plain dict from name to class or function; ``lookup`` turns an unknown name into
the same one-line error everywhere: what was asked for and what exists.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

from offload.errors import ConfigError, OffloadError

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, what: str, error: type[OffloadError] = ConfigError,
           also: Iterable[str] = (), ordered: bool = False) -> T:
    """``registry[name]`` (case-insensitive), or ``error("unknown WHAT 'name'", "use one of: ...")``.

    ``also`` lists accepted names that are not in the registry (such as "none"), shown first;
    ``ordered`` keeps the registry's own order in the hint instead of sorting it.
    """
    key = str(name).lower()
    if key in registry:
        return registry[key]
    names = list(registry) if ordered else sorted(registry)
    raise error(f"unknown {what} {name!r}", f"use one of: {', '.join([*also, *names])}")


def check_name(registry: Mapping[str, object], name: str, what: str, error: type[OffloadError] = ConfigError,
               also: Iterable[str] = (), ordered: bool = False) -> None:
    """Raise lookup's error unless ``name`` is in ``registry`` or ``also``."""
    if str(name).lower() not in set(also):
        lookup(registry, name, what, error, also, ordered)
