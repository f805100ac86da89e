"""The registry's refusals, the plugin manager, and the abstract-or-final rule."""

import inspect

import equinox as eqx
import pluggy
import pytest

import ddiff


class _Schedule(ddiff.AbstractSchedule):
    def alpha(self, t):
        return 1.0 - t


class _Other(ddiff.AbstractSchedule):
    def alpha(self, t):
        return 1.0 - t**2


def test_builtins_register_through_entry_points(registry):
    entries = {(e.slot, e.name): e.plugin for e in registry}
    assert entries[("process", "masked")] == "masked"
    assert entries[("network", "transformer")] == "networks"
    assert entries[("process", "uniform")] == "uniform"
    assert entries[("objective", "md4_elbo")] == "md4"
    assert entries[("data", "markov")] == "synthetic"
    manager = ddiff.make_plugin_manager()
    names = {manager.get_name(p) for p in manager.get_plugins()}
    assert {"md4", "networks", "synthetic"} <= names


def test_autoload_can_be_disabled(monkeypatch):
    monkeypatch.setenv("DDIFF_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry = ddiff.build_registry(ddiff.make_plugin_manager())
    assert list(registry) == []


def test_refuses_duplicate_names():
    registry = ddiff.Registry()
    registry.register("schedule", "s", _Schedule)
    with pytest.raises(ddiff.RegistryError, match="registered twice"):
        registry.register("schedule", "s", _Other)


def test_refuses_wrong_base_and_abstract_and_unknown_slot():
    registry = ddiff.Registry()
    with pytest.raises(ddiff.RegistryError, match="not a subclass of AbstractForwardProcess"):
        registry.register("process", "s", _Schedule)
    with pytest.raises(ddiff.RegistryError, match="abstract class AbstractSchedule"):
        registry.register("schedule", "abstract", ddiff.AbstractSchedule)
    with pytest.raises(ddiff.RegistryError, match="unknown slot"):
        registry.register("scheduler", "s", _Schedule)


def test_register_all_registers_a_table_in_order_with_the_same_refusals():
    registry = ddiff.Registry()
    registry.register_all({"schedule": {"s": _Schedule, "t": _Other}})
    assert registry.get("schedule", "s") is _Schedule and registry.get("schedule", "t") is _Other
    with pytest.raises(ddiff.RegistryError, match="registered twice"):
        registry.register_all({"schedule": {"u": _Schedule, "s": _Other}})
    assert registry.get("schedule", "u") is _Schedule
    with pytest.raises(ddiff.RegistryError, match="not a subclass of AbstractForwardProcess"):
        registry.register_all({"process": {"p": _Schedule}})
    with pytest.raises(ddiff.RegistryError, match="unknown slot"):
        registry.register_all({"scheduler": {"s": _Schedule}})


def test_unknown_name_lists_available_and_closest(registry):
    with pytest.raises(ddiff.RegistryError) as info:
        registry.get("schedule", "cosin")
    message = str(info.value)
    assert "did you mean 'cosine'?" in message
    assert "linear" in message


def test_misspelt_hook_implementation_fails_loudly():
    class Plugin:
        @ddiff.hookimpl
        def ddiff_register_component(self, registry):  # missing the trailing "s"
            pass

    with pytest.raises(pluggy.PluginValidationError):
        ddiff.make_plugin_manager(load_entry_points=False, plugins=[Plugin()])


def test_third_party_plugin_object_registers():
    class Plugin:
        @ddiff.hookimpl
        def ddiff_register_components(self, registry):
            registry.register("schedule", "mine", _Schedule)

    manager = ddiff.make_plugin_manager(load_entry_points=False, plugins=[Plugin()])
    registry = ddiff.build_registry(manager)
    assert registry.get("schedule", "mine") is _Schedule


def test_every_hook_is_documented_and_tested():
    from ddiff import _hookspecs

    hooks = [name for name, _ in inspect.getmembers(_hookspecs, inspect.isfunction) if name.startswith("ddiff_")]
    docs = open("docs/plugins.md").read()
    tests = open(__file__).read()
    for hook in hooks:
        assert hook in docs, f"hook {hook} is not documented in docs/plugins.md"
        assert hook in tests, f"hook {hook} has no test"


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def test_abstract_or_final(registry):
    """Every class under a protocol is abstract (named Abstract*) or final (no subclasses)."""
    for base in ddiff.SLOTS.values():
        for cls in _all_subclasses(base):
            if cls.__module__.startswith("tests") or cls.__module__ == __name__:
                continue
            if cls.__name__.startswith("Abstract"):
                continue
            concrete_children = [c for c in cls.__subclasses__() if not c.__module__.startswith("test")]
            assert not concrete_children, f"{cls.__qualname__} is concrete but subclassed by {concrete_children}"
            assert not inspect.isabstract(cls) or not issubclass(cls, eqx.Module), (
                f"{cls.__qualname__} is abstract but not named Abstract*"
            )


def test_registered_classes_are_final(registry):
    for entry in registry:
        assert not entry.cls.__name__.startswith("Abstract")
        assert not inspect.isabstract(entry.cls)
