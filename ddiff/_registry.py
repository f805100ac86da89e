"""The component registry and the plugin manager that fills it."""

import dataclasses
import difflib
import importlib.metadata
import inspect
import os
import weakref
from collections.abc import Iterable, Iterator, Mapping

import pluggy

from ddiff import _hookspecs
from ddiff._data import AbstractDataSource
from ddiff._errors import RegistryError
from ddiff._network import AbstractNetwork
from ddiff._objective import AbstractObjective
from ddiff._parameterization import AbstractParameterization
from ddiff._process import AbstractForwardProcess
from ddiff._sampler import AbstractSampler
from ddiff._sampling_transforms import AbstractLogProbTransform
from ddiff._schedule import AbstractSchedule
from ddiff._weighting import AbstractWeighting

SLOTS: dict[str, type] = {
    "data": AbstractDataSource,
    "process": AbstractForwardProcess,
    "schedule": AbstractSchedule,
    "parameterization": AbstractParameterization,
    "network": AbstractNetwork,
    "objective": AbstractObjective,
    "sampler": AbstractSampler,
    "weighting": AbstractWeighting,
    "transform": AbstractLogProbTransform,
}
"""Registry slot -> the protocol its classes must implement."""

ENTRY_POINT_GROUP = "ddiff"
"""The entry-point group a plugin package declares its plugin modules in."""
DISABLE_AUTOLOAD_ENV = "DDIFF_DISABLE_PLUGIN_AUTOLOAD"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered component."""

    slot: str
    name: str
    cls: type
    plugin: str


@dataclasses.dataclass(frozen=True)
class BrokenPlugin:
    """A plugin of the ``ddiff`` entry-point group whose module failed to import; the
    other plugins work without it.

    Attributes:
        name: the entry point's name (the plugin's name).
        entry_point: ``name = module`` as the package declares it.
        error: the exception, ``ImportError: No module named 'torch'``.
    """

    name: str
    entry_point: str
    error: str

    def __str__(self) -> str:
        return (
            f"plugin {self.name!r} (entry point {self.entry_point}) failed to import: "
            f"{self.error}; its components are unavailable"
        )


class Registry:
    """Components by slot and name. Refuses duplicates, wrong bases and abstract classes.

    Attributes:
        broken: the plugins whose module failed to import (:class:`BrokenPlugin`).
    """

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {slot: {} for slot in SLOTS}
        self._current_plugin = "<direct>"
        self.broken: tuple[BrokenPlugin, ...] = ()

    def register(self, slot: str, name: str, cls: type) -> None:
        """Register ``cls`` under ``name`` in ``slot``.

        Raises:
            RegistryError: unknown slot, a name already taken in the slot, a class that
                does not implement the slot's protocol, or an abstract class.
        """
        if slot not in SLOTS:
            raise RegistryError(
                f"plugin {self._current_plugin!r} registers {name!r} in unknown slot "
                f"{slot!r}; slots are: {', '.join(SLOTS)}"
            )
        base = SLOTS[slot]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise RegistryError(
                f"plugin {self._current_plugin!r} registers {cls!r} as {slot} {name!r}, "
                f"but it is not a subclass of {base.__name__}"
            )
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
            raise RegistryError(
                f"plugin {self._current_plugin!r} registers abstract class "
                f"{cls.__name__} as {slot} {name!r}; implement: {missing}"
            )
        existing = self._entries[slot].get(name)
        if existing is not None:
            raise RegistryError(
                f"{slot} {name!r} is registered twice: by plugin {existing.plugin!r} "
                f"({existing.cls.__qualname__}) and by plugin {self._current_plugin!r} "
                f"({cls.__qualname__}); rename one of them"
            )
        self._entries[slot][name] = Entry(slot, name, cls, self._current_plugin)

    def register_all(self, components: Mapping[str, Mapping[str, type]]) -> None:
        """Register a table ``{slot: {name: cls}}``: :meth:`register` for each entry, in
        the table's order, with its checks and messages.

        Raises:
            RegistryError: as :meth:`register`, at the first entry it refuses (the entries
                before it stay registered).
        """
        for slot, classes in components.items():
            for name, cls in classes.items():
                self.register(slot, name, cls)

    def get(self, slot: str, name: str) -> type:
        """The class registered as ``name`` in ``slot``; an unknown name lists the
        available ones with the closest match."""
        return self.entry(slot, name).cls

    def entry(self, slot: str, name: str) -> Entry:
        if slot not in SLOTS:
            raise RegistryError(f"unknown slot {slot!r}; slots are: {', '.join(SLOTS)}")
        entries = self._entries[slot]
        if name not in entries:
            raise RegistryError(unknown_name_message(slot, name, entries, self.broken))
        return entries[name]

    def name_of(self, slot: str, cls: type) -> str:
        """The registered name of ``cls`` in ``slot``."""
        for entry in self._entries[slot].values():
            if entry.cls is cls:
                return entry.name
        raise RegistryError(f"{cls.__qualname__} is not registered as a {slot}")

    def names(self, slot: str) -> list[str]:
        return sorted(self._entries[slot])

    def __iter__(self) -> Iterator[Entry]:
        for slot in SLOTS:
            yield from (self._entries[slot][name] for name in sorted(self._entries[slot]))

    def _from_plugin(self, plugin: str) -> "Registry":
        self._current_plugin = plugin
        return self


def unknown_name_message(
    slot: str, name: object, names: Iterable[str], broken: Iterable[BrokenPlugin] = ()
) -> str:
    names = sorted(names)
    close = difflib.get_close_matches(str(name), names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    available = ", ".join(names) or "none registered"
    failed = ", ".join(repr(plugin.name) for plugin in broken)
    failed = f"; plugins that failed to import, which may provide it: {failed}" if failed else ""
    return f"unknown {slot} {name!r}{hint} (available: {available}){failed}"


def make_plugin_manager(
    *, load_entry_points: bool | None = None, plugins: Iterable[object] = ()
) -> pluggy.PluginManager:
    """Build ddiff's plugin manager: hook specifications, the entry points of the
    ``ddiff`` group (unless ``DDIFF_DISABLE_PLUGIN_AUTOLOAD`` is set), then ``plugins``.
    A hook implementation whose name matches no specification is an error."""
    manager = pluggy.PluginManager(_hookspecs.PROJECT_NAME)
    manager.add_hookspecs(_hookspecs)
    if load_entry_points is None:
        load_entry_points = not os.environ.get(DISABLE_AUTOLOAD_ENV)
    if load_entry_points:
        _BROKEN[manager] = _load_entry_points(manager)
    for plugin in plugins:
        manager.register(plugin)
    manager.check_pending()
    return manager


_BROKEN: "weakref.WeakKeyDictionary[pluggy.PluginManager, tuple[BrokenPlugin, ...]]" = (
    weakref.WeakKeyDictionary()
)
"""The plugins each manager failed to import (read by :func:`build_registry`)."""


def _load_entry_points(manager: pluggy.PluginManager) -> tuple[BrokenPlugin, ...]:
    """Register the module of every entry point of the ``ddiff`` group; a module that
    fails to import is skipped and returned, so one broken package cannot stop the
    others (pluggy's own loader raises on the first)."""
    broken: dict[str, BrokenPlugin] = {}
    for distribution in importlib.metadata.distributions():
        for entry_point in distribution.entry_points:
            name = entry_point.name
            if entry_point.group != ENTRY_POINT_GROUP or name in broken:
                continue
            if manager.has_plugin(name) or manager.is_blocked(name):
                continue
            try:
                plugin = entry_point.load()
            except Exception as error:  # noqa: BLE001 - any failure to import is reported
                message = str(error).splitlines()[0] if str(error) else ""
                broken[name] = BrokenPlugin(
                    name, f"{name} = {entry_point.value}", f"{type(error).__name__}: {message}"
                )
                continue
            manager.register(plugin, name=name)
    return tuple(broken.values())


def build_registry(manager: pluggy.PluginManager) -> Registry:
    """Call every plugin's ``ddiff_register_components`` hook into a fresh registry
    (which lists in ``broken`` the plugins that failed to import)."""
    registry = Registry()
    registry.broken = _BROKEN.get(manager, ())
    for impl in manager.hook.ddiff_register_components.get_hookimpls():
        impl.function(registry=registry._from_plugin(impl.plugin_name))
    registry._current_plugin = "<direct>"
    return registry


_default: Registry | None = None


def default_registry() -> Registry:
    """The registry built from the installed plugins (cached for the process)."""
    global _default
    if _default is None:
        _default = build_registry(make_plugin_manager())
    return _default
