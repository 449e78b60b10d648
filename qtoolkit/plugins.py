"""Find, load and ask the plugins: pluggy over the entry-point group "qtoolkit".

Every plugin, built-in or third-party, is a module named by an entry point in the group "qtoolkit"; the
built-ins (plugins/, imported as `qtoolkit_plugins`) are declared in qtoolkit's own pyproject.toml, so they
load by the same path as any installed package's. Which entry points load:

- QTOOLKIT_LOAD_PLUGINS=a,b: exactly these (entry-point or distribution names), nothing else;
- else QTOOLKIT_DISABLE_PLUGIN_AUTOLOAD=1: only the plugins that qtoolkit's own distribution declares;
- else every installed one.

A plugin whose import (or hook) fails is reported in one line and skipped; everything else still works.
The registry is built once per process, on first use.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .errors import QtoolkitError
from .registry import KINDS, PluginConflict, Registry

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "qtoolkit"
LOAD_ENV = "QTOOLKIT_LOAD_PLUGINS"
DISABLE_AUTOLOAD_ENV = "QTOOLKIT_DISABLE_PLUGIN_AUTOLOAD"
OWN_DISTRIBUTION = "qtoolkit"


@dataclass
class PluginInfo:
    """One loaded plugin: where it comes from and what it registered (record names, by hook)."""

    name: str
    version: str
    distribution: str
    module: str
    registered: dict[str, list[str]] = field(default_factory=lambda: {hook: [] for hook in KINDS})

    def as_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "distribution": self.distribution, "module": self.module,
                **{KINDS[hook][2]: names for hook, names in self.registered.items()}}


@dataclass
class _Loaded:
    manager: pluggy.PluginManager
    registry: Registry
    plugins: list[PluginInfo]


_loaded: _Loaded | None = None


def _selected_entry_points() -> list[metadata.EntryPoint]:
    found = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    wanted = os.environ.get(LOAD_ENV)
    if wanted is not None:
        names = [name.strip() for name in wanted.split(",") if name.strip()]
        known = {ep.name for ep in found} | {_distribution(ep) for ep in found}
        missing = [name for name in names if name not in known]
        if missing:
            raise QtoolkitError(f"{LOAD_ENV} names {', '.join(map(repr, missing))}, which is not installed: "
                                f"installed plugins are {', '.join(sorted(ep.name for ep in found)) or 'none'}")
        return [ep for ep in found if ep.name in names or _distribution(ep) in names]
    if os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip() not in ("", "0"):
        return [ep for ep in found if _distribution(ep) == OWN_DISTRIBUTION]
    return found


def _distribution(ep: metadata.EntryPoint) -> str:
    return ep.dist.metadata["Name"] if ep.dist is not None else "unknown"


def _records_of(manager: pluggy.PluginManager, plugin: Any) -> list[tuple[str, Any]]:
    """(hook, record) for everything `plugin` registers: each of its hooks called with a collecting `register`."""
    found = []
    for hook in KINDS:
        for impl in getattr(manager.hook, hook).get_hookimpls():
            if impl.plugin is plugin:
                register = lambda record, hook=hook: found.append((hook, record))  # noqa: E731
                impl.function(**{arg: register for arg in impl.argnames})
    return found


def add_plugin(plugin: Any, info: PluginInfo, state: _Loaded | None = None) -> None:
    """Register `plugin` (a module or object with hookimpls) and file its records; all or nothing.

    Raises PluginConflict when it registers a name another plugin has; any other failure propagates.
    """
    state = state or loaded()
    state.manager.register(plugin, name=info.name)
    try:
        records = _records_of(state.manager, plugin)
        state.registry.check(records, info.name)
    except BaseException:
        state.manager.unregister(plugin)
        raise
    for hook, record in records:
        state.registry.add(hook, record, info.name)
        info.registered[hook].append(record.name)
    state.plugins.append(info)


def _load() -> _Loaded:
    manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
    manager.add_hookspecs(hookspecs)
    state = _Loaded(manager, Registry(), [])
    for ep in _selected_entry_points():
        info = PluginInfo(ep.name, ep.dist.version if ep.dist is not None else "unknown", _distribution(ep), ep.value)
        try:
            add_plugin(ep.load(), info, state)
        except PluginConflict:
            raise  # two plugins claim one name: the user has to choose
        except Exception as e:  # noqa: BLE001 - a broken plugin must not take the others down
            log.warning("plugin %r (entry point %s = %s) failed to load and is skipped: %s: %s",
                        ep.name, ENTRY_POINT_GROUP, ep.value, type(e).__name__, e)
    return state


def loaded() -> _Loaded:
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def reload() -> None:
    """Forget the loaded plugins (tests change the environment variables or the installed packages)."""
    global _loaded
    _loaded = None
    importlib.invalidate_caches()  # entry points of packages installed since the last look


def registry() -> Registry:
    return loaded().registry


def plugin_infos() -> list[PluginInfo]:
    return loaded().plugins


def calibration_strategy(name: str):
    return registry().get("register_calibration_strategies", name)


def rounding_method(name: str):
    return registry().get("register_rounding_methods", name)


def backend(name: str):
    return registry().get("register_backends", name)


def timestep_boundaries(name: str):
    return registry().get("register_timestep_boundaries", name)


def names(hook: str) -> list[str]:
    return sorted(registry().records[hook])
