"""Finders shipped by other packages, through the entry-point group ``reflora.finders``.

A distribution declares, in its ``pyproject.toml``::

    [project.entry-points."reflora.finders"]
    mylib_lora = "mylib.reflora_finder:find_mylib_lora"

The object it names is a finder, ``finder(name, module, options) -> list[LoRAPair] | None``
(see :func:`reflora.adapters.register_finder`), with two optional attributes: ``priority`` (an
int, default 0; built-ins use 100, 50, 10 and -100) and ``supports`` (a short description).

Plugins are loaded lazily: importing ``reflora`` imports none of them; the first call to
:func:`~reflora.adapters.find_pairs` or :func:`~reflora.adapters.list_finders` loads them all,
once per process, and registers them by priority. A plugin that fails to import, names no
callable, or clashes with a registered finder gives one warning naming it and is left out; one
that raises while finding is disabled with one warning. Discovery itself never breaks.
"""

from __future__ import annotations

import functools
import importlib.metadata
import warnings
from typing import Any, Callable

__all__ = ["ENTRY_POINT_GROUP", "FinderPluginWarning", "load_plugins"]

ENTRY_POINT_GROUP = "reflora.finders"


class FinderPluginWarning(UserWarning):
    """A finder plugin could not be used; discovery goes on without it."""


_loaded = False


def _origin(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    where = f" from {dist.metadata['Name']} {dist.version}" if dist is not None else ""
    return f"finder plugin {ep.name!r} ({ep.value}){where}"


def _guarded(finder: Callable, origin: str) -> Callable:
    """Disable a plugin finder that raises, with one warning, instead of breaking discovery."""
    broken: list[bool] = []

    @functools.wraps(finder)
    def call(name: str, module: Any, options: Any):
        if broken:
            return None
        try:
            return finder(name, module, options)
        except Exception as err:  # a third party's bug must not stop discovery
            broken.append(True)
            warnings.warn(
                f"{origin} raised {type(err).__name__}: {err} on module {name!r}; it is disabled for this process",
                FinderPluginWarning, stacklevel=2,
            )
            return None

    return call


def load_plugins(register: Callable[..., Any], registered: Callable[[], set[str]]) -> None:
    """Load every ``reflora.finders`` entry point once and register it (called by find_pairs)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception as err:  # a broken metadata directory somewhere on sys.path
        warnings.warn(f"could not list {ENTRY_POINT_GROUP!r} entry points: {err}", FinderPluginWarning, stacklevel=3)
        return
    for ep in sorted(eps, key=lambda e: e.name):
        origin = _origin(ep)
        try:
            finder = ep.load()
        except Exception as err:
            warnings.warn(f"{origin} failed to import ({type(err).__name__}: {err}); discovery goes on without it",
                          FinderPluginWarning, stacklevel=3)
            continue
        priority = getattr(finder, "priority", 0)
        if not callable(finder) or isinstance(priority, bool) or not isinstance(priority, int):
            warnings.warn(f"{origin} is not a finder (a callable with an optional int `priority`); left out",
                          FinderPluginWarning, stacklevel=3)
            continue
        if ep.name in registered():
            warnings.warn(f"{origin} is named like a finder already registered; left out",
                          FinderPluginWarning, stacklevel=3)
            continue
        supports = getattr(finder, "supports", "") or f"{ep.name} (plugin)"
        register(ep.name, _guarded(finder, origin), priority=priority, supports=str(supports))
