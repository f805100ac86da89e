"""``ddiff plugins [SLOT [NAME]]``: every registered component by slot with its plugin,
or one component's documentation, recipe keys and capabilities."""

import argparse
import difflib
import inspect
import sys
import types
import typing
from typing import Any

from ddiff._builder import constructor_hints
from ddiff._capabilities import Capable
from ddiff._errors import RecipeError
from ddiff._network import SUPPLIED_NETWORK_ARGUMENTS
from ddiff._registry import SLOTS, Registry, default_registry

SUPPLIED = frozenset({*SUPPLIED_NETWORK_ARGUMENTS, "vocab_size", "seq_len", "num_classes"})
"""Constructor arguments ddiff sets itself, never written in a recipe."""


NAME = "plugins"
HELP = "list registered components, or describe one"
DESCRIPTION = (
    "Without arguments, list every registered component by slot with its plugin, and the "
    "plugins that failed to import. With SLOT, list that slot. With SLOT NAME, print the "
    "component's documentation, its recipe keys with types and defaults, and the "
    "capabilities it provides and requires."
)
"""The command's name, its line in ``ddiff --help`` and the text atop its own help."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``plugins`` command's arguments."""
    parser.add_argument("slot", nargs="?", default=None, help="a slot: data, process, schedule, ...")
    parser.add_argument("name", nargs="?", default=None, help="a registered name in the slot")


def type_name(hint: Any) -> str:
    """How ``ddiff plugins SLOT NAME`` shows a recipe key's type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(hint) if o is not type(None)]
        shown = " | ".join(type_name(o) for o in options)
        return f"{shown} | null" if len(options) < len(typing.get_args(hint)) else shown
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if isinstance(hint, type):
        for slot, base in SLOTS.items():
            if issubclass(hint, base):
                return f"{slot} section"
        return hint.__name__
    if origin is tuple:
        arguments = typing.get_args(hint)
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return f"list of {type_name(arguments[0])}"
    return str(hint).replace("typing.", "")


def recipe_keys(cls: type) -> tuple[list[tuple[str, str, str]], list[str]]:
    """The recipe keys of a component class as (name, type, default) with ``required``
    for a key without default, and the constructor arguments ddiff sets itself."""
    hints = constructor_hints(cls)
    keys, set_by_ddiff = [], []
    for name, parameter in inspect.signature(cls).parameters.items():
        if parameter.kind not in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
            continue
        if name in SUPPLIED:
            set_by_ddiff.append(name)
            continue
        default = "required" if parameter.default is inspect.Parameter.empty else repr(parameter.default)
        keys.append((name, type_name(hints.get(name, Any)), default))
    return keys, set_by_ddiff


def public_path(cls: type) -> str:
    """Where a class is imported from: the shortest public module that exports it
    (``ddiff_plugins.md4.TopPSampler`` rather than its private ``_samplers`` file)."""
    parts = cls.__module__.split(".")
    for end in range(1, len(parts) + 1):
        if parts[end - 1].startswith("_"):
            break
        module = sys.modules.get(".".join(parts[:end]))
        if module is not None and getattr(module, cls.__qualname__, None) is cls:
            return f"{module.__name__}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def describe_component(registry: Registry, slot: str, name: str) -> None:
    """Print a component's class, documentation, recipe keys and capabilities."""
    entry = registry.entry(slot, name)
    cls = entry.cls
    print(f"{slot} {name}: {public_path(cls)}  [plugin: {entry.plugin}]\n")
    print(inspect.cleandoc(cls.__doc__ or "(no documentation)"))
    keys, derived = recipe_keys(cls)
    print("\nrecipe keys:" if keys else "\nrecipe keys: none")
    width = max((len(key) for key, _, _ in keys), default=0)
    for key, shown, default in keys:
        print(f"  {key:<{width}}  {shown} = {default}")
    if derived:
        print(f"set by ddiff: {', '.join(derived)}")
    provides = ", ".join(sorted(cls.provides)) or "nothing"
    if cls.capabilities is not Capable.capabilities:
        provides = f"worked out from its settings by {cls.__qualname__}.capabilities()"
    print(f"provides: {provides}")
    requires = "; ".join(f"{other}: {', '.join(sorted(needed))}" for other, needed in cls.requires.items())
    print(f"requires: {requires or 'nothing'}")
    print(f"recipe: {slot}: {{kind: {name}{''.join(f', {k}: ...' for k, _, d in keys if d == 'required')}}}")


def run(args: argparse.Namespace) -> None:
    """List the components (and the plugins that failed to import), or describe one."""
    registry = default_registry()
    if args.slot is not None and args.slot not in SLOTS:
        close = difflib.get_close_matches(args.slot, SLOTS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"unknown slot {args.slot!r}{hint} (slots: {', '.join(SLOTS)})", source="command line")
    if args.name is not None:
        describe_component(registry, args.slot, args.name)
        return
    entries = list(registry)
    for slot in SLOTS if args.slot is None else (args.slot,):
        print(f"{slot}:")
        for entry in (e for e in entries if e.slot == slot):
            cls = entry.cls
            print(f"  {entry.name:<22} {public_path(cls)}  [plugin: {entry.plugin}]")
    if registry.broken and args.slot is None:
        print("broken plugins (their components are unavailable):")
        for plugin in registry.broken:
            print(f"  {plugin.name:<22} entry point {plugin.entry_point}: {plugin.error}")
