"""The plugin registry: built-in plugins first, then every entry point in group ``bitsweep``.

A third-party plugin that fails to import, or whose hook raises or returns
something unusable, costs one warning naming it and its distribution; the rest
of bitsweep keeps working.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import threading
import warnings
from dataclasses import dataclass

import pluggy

from bitsweep import __version__, hookspecs
from bitsweep.errors import BitsweepError, first_line

ENTRY_POINT_GROUP = "bitsweep"
BUILTIN_PLUGINS = tuple(f"bitsweep.plugins.{name}" for name in (
    "schemes", "compressors", "models", "efficientnet_lite", "datasets", "photos", "imagefolder", "recipes"))
# kind -> the hook that registers it
HOOKS = {
    "scheme": "register_schemes",
    "model source": "register_model_sources",
    "dataset": "register_datasets",
    "compressor": "register_compressors",
    "recipe": "register_recipes",
}


class PluginWarning(UserWarning):
    """A plugin could not be loaded or registered and was skipped."""


@dataclass(frozen=True)
class Provider:
    """Where a registered object comes from."""

    plugin: str
    distribution: str
    version: str

    def __str__(self):
        return f"plugin {self.plugin!r} (distribution {self.distribution} {self.version})"


@dataclass(frozen=True)
class Registered:
    kind: str
    name: str
    obj: object
    provider: Provider


class Registry:
    """Every scheme, model source, dataset and compressor, by kind and name."""

    def __init__(self, manager: pluggy.PluginManager, providers: dict[str, Provider], failed: list[str] = ()):
        self._manager = manager
        self._providers = providers
        # kind -> why plugins that might provide it do not: a failed import counts for every kind
        self._failed: dict[str, list[str]] = {kind: list(failed) for kind in HOOKS}
        self._lock = threading.Lock()
        self._by_kind: dict[str, dict[str, Registered]] = {}

    def entries(self, kind: str) -> dict[str, Registered]:
        """Name -> registration for one kind, collected once, in registration order."""
        with self._lock:
            if kind not in self._by_kind:
                self._by_kind[kind] = self._collect(kind)
            return self._by_kind[kind]

    def get(self, kind: str, name: str):
        problem = self.missing(kind, name)
        if problem:
            raise BitsweepError(problem)
        return self.entries(kind)[name].obj

    def missing(self, kind: str, name: str) -> str | None:
        """Why ``name`` is not a registered ``kind`` (naming plugins that failed and may provide it), or None."""
        entries = self.entries(kind)
        if name in entries:
            return None
        available = ", ".join(sorted(entries)) or "none"
        failed = "".join(f"; {why} and may provide it: fix or uninstall it" for why in self._failed[kind])
        return f"unknown {kind} {name!r}; available: {available} (see `bitsweep plugins`){failed}"

    @contextlib.contextmanager
    def blame(self, kind: str, name: str):
        """Run a registered object's code; an unexpected exception becomes one error naming its plugin."""
        try:
            yield
        except BitsweepError:
            raise
        except Exception as exc:
            entry = self.entries(kind).get(name)
            if entry is None:
                raise
            raise BitsweepError(f"{kind} {name!r} of {entry.provider} failed: {type(exc).__name__}: "
                                f"{first_line(exc)}") from exc

    def _collect(self, kind: str) -> dict[str, Registered]:
        found: dict[str, Registered] = {}
        hook = getattr(self._manager.hook, HOOKS[kind])
        for impl in hook.get_hookimpls():  # registration order: built-ins first
            provider = self._providers[impl.plugin_name]
            try:
                objects = list(impl.function() or [])
            except Exception as exc:  # a third party's bug must not stop bitsweep
                _warn(f"{provider} failed in {HOOKS[kind]}: {type(exc).__name__}: {exc}; its {kind}s are skipped")
                self._failed[kind].append(f"{provider} failed in {HOOKS[kind]} ({type(exc).__name__}: "
                                          f"{first_line(exc)})")
                continue
            for obj in objects:
                name = getattr(obj, "name", None)
                if not isinstance(name, str) or not name:
                    _warn(f"{provider} registered a {kind} without a name ({obj!r}); it is skipped")
                elif name in found:
                    _warn(f"{provider} registers {kind} {name!r}, already provided by {found[name].provider}; "
                          "the first one is kept")
                else:
                    found[name] = Registered(kind, name, obj, provider)
        return found


def _warn(message: str) -> None:
    warnings.warn(message, PluginWarning, stacklevel=3)


def build_registry() -> Registry:
    """A fresh registry: built-ins, then each installed entry point (failures become warnings)."""
    manager = pluggy.PluginManager("bitsweep")
    manager.add_hookspecs(hookspecs)
    providers: dict[str, Provider] = {}
    failed = []
    for module_name in BUILTIN_PLUGINS:
        plugin = "builtin:" + module_name.rsplit(".", 1)[1]
        manager.register(importlib.import_module(module_name), name=plugin)
        providers[plugin] = Provider(plugin, "bitsweep", __version__)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry_point.dist
        provider = Provider(entry_point.name, dist.name if dist else "unknown",
                            dist.version if dist else "unknown")
        try:
            manager.register(entry_point.load(), name=entry_point.name)
        except Exception as exc:  # ImportError, a bad hook signature, a duplicate plugin name...
            _warn(f"{provider} failed to load: {type(exc).__name__}: {exc}; it is skipped")
            failed.append(f"{provider} failed to load ({type(exc).__name__}: {first_line(exc)})")
            continue
        providers[entry_point.name] = provider
    return Registry(manager, providers, failed)


@functools.cache
def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    return build_registry()
