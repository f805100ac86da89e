"""The recipe builder: a ``kind:`` section mapped onto a registered component.

A component section names a registered class with ``kind:``; its other keys are the
class's constructor arguments, checked against the constructor's signature and type
hints, with nested components built recursively. Values ddiff derives itself (the
vocabulary size from the data, the network's input and output sizes) are never written
in a section. Every error names the source, the dotted key path and what is accepted; a
component's own :class:`~ddiff.RecipeError` carries a path relative to its section, to
which the builder adds the section's path.
"""

import dataclasses
import inspect
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from beartype import BeartypeConf
from beartype.door import is_bearable

from ddiff._errors import DdiffError, RecipeError
from ddiff._network import SUPPLIED_NETWORK_ARGUMENTS, AbstractNetwork
from ddiff._registry import SLOTS, Registry, default_registry, unknown_name_message

_TOWER = BeartypeConf(is_pep484_tower=True)


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """A validated network section, built later when its sizes and key are known.

    Attributes:
        name: the registered kind.
        cls: the network class.
        kwargs: its hyper-parameters from the section.
        path: where the section lies in the recipe, prefixed to the network's own errors.
    """

    name: str
    cls: type
    kwargs: Mapping[str, Any]
    path: str = "network"

    def build(self, **supplied: Any) -> AbstractNetwork:
        """Construct the network with the arguments ddiff supplies (sizes, key)."""
        accepted = inspect.signature(self.cls).parameters
        taken = {k: v for k, v in supplied.items() if k in accepted}
        try:
            return self.cls(**{**self.kwargs, **taken})
        except RecipeError as error:
            raise RecipeError(
                error.message, source=error.source, path=_join(self.path, error.path)
            ) from None


class SectionBuilder:
    """Builds recipe sections from one registry, naming ``source`` in its errors.

    Arguments:
        registry: where ``kind:`` names are looked up.
        source: the recipe file (or another origin) named in every error.
        nested: plain classes (e.g. frozen dataclasses of settings) that a section may
            hold as a nested mapping, built from their constructor arguments.
    """

    def __init__(self, registry: Registry, source: str, nested: tuple[type, ...] = ()):
        self.registry = registry
        self.source = source
        self.nested = nested

    def error(self, path: str, message: str) -> RecipeError:
        """A :class:`~ddiff.RecipeError` at the dotted ``path`` of this source."""
        return RecipeError(message, source=self.source, path=path)

    @staticmethod
    def describe(value: Any) -> str:
        """How an error names a recipe value: ``a mapping``, ``a list``, ``int 3``."""
        return _describe(value)

    def component(
        self, slot: str, raw: Any, path: str, supplied: Mapping[str, Any], *, build: bool = True
    ) -> tuple[Any, dict[str, Any], str]:
        """Build the ``slot`` section ``raw`` found at ``path``: the component (a
        :class:`NetworkSpec` when not ``build``), its resolved mapping and its kind."""
        if raw is None:
            raise self.error(path, f"missing section; give a mapping with kind: <{slot} name>")
        if isinstance(raw, str):
            raw = {"kind": raw}
        if not isinstance(raw, dict):
            raise self.error(path, f"expected a mapping with kind: ..., got {_describe(raw)}")
        if "kind" not in raw:
            names = ", ".join(self.registry.names(slot))
            raise self.error(path, f"missing 'kind' (registered {slot} kinds: {names})")
        name = raw["kind"]
        if not isinstance(name, str):
            raise self.error(f"{path}.kind", f"kind must be a name, got {_describe(name)}")
        try:
            cls = self.registry.get(slot, name)
        except DdiffError:
            raise self.error(
                f"{path}.kind",
                unknown_name_message(slot, name, self.registry.names(slot), self.registry.broken),
            ) from None
        arguments = {k: v for k, v in raw.items() if k != "kind"}
        kwargs, resolved = self.arguments(cls, arguments, path, supplied, f"{slot} {name!r}")
        resolved = {"kind": name, **resolved}
        if not build:
            return NetworkSpec(name, cls, kwargs, path), resolved, name
        return self.construct(cls, kwargs, path), resolved, name

    def construct(self, cls: type, kwargs: dict[str, Any], path: str) -> Any:
        """``cls(**kwargs)`` for the section at ``path``; a :class:`~ddiff.RecipeError`
        raised there with a path relative to the section gets the section's path in front
        (``steps`` under ``eval.objectives[0]`` is ``eval.objectives[0].steps``)."""
        try:
            return cls(**kwargs)
        except RecipeError as error:
            raise self.error(_join(path, error.path), error.message) from None
        except DdiffError as error:
            raise self.error(path, str(error)) from None
        except (TypeError, ValueError) as error:
            raise self.error(path, f"invalid arguments: {error}") from None

    def arguments(
        self, cls: type, raw: Mapping[str, Any], path: str, supplied: Mapping[str, Any], what: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The constructor arguments of ``cls`` from the section ``raw`` at ``path`` (and
        ``supplied`` for the values ddiff derives and supplies), with their resolved values."""
        parameters = {
            name: p
            for name, p in inspect.signature(cls).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }
        hints = constructor_hints(cls)
        settable = [n for n in parameters if n not in supplied and n not in SUPPLIED_NETWORK_ARGUMENTS]
        for key in raw:
            if key in parameters and key not in settable:
                raise self.error(
                    f"{path}.{key}", f"{key} is set by ddiff from the data and model; remove it"
                )
            if key not in parameters:
                accepted = ", ".join(settable)
                raise self.error(
                    f"{path}.{key}", f"unknown key for {what} (accepted: {accepted or 'none'})"
                )
        kwargs: dict[str, Any] = {}
        resolved: dict[str, Any] = {}
        for name in settable:
            parameter = parameters[name]
            hint = hints.get(name, Any)
            if name in raw:
                value, shown = self.value(hint, raw[name], f"{path}.{name}", supplied)
                kwargs[name] = value
                resolved[name] = shown
            elif parameter.default is inspect.Parameter.empty:
                raise self.error(f"{path}.{name}", f"required key missing for {what}")
            else:
                resolved[name] = _plain(parameter.default)
        for name in parameters:
            if name in supplied and name not in raw:
                kwargs[name] = supplied[name]
        return kwargs, resolved

    def value(self, hint: Any, value: Any, path: str, supplied: Mapping[str, Any]) -> tuple[Any, Any]:
        """``value`` checked against the type ``hint`` (components and nested settings
        built), with its resolved form."""
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            options = typing.get_args(hint)
            if value is None and type(None) in options:
                return None, None
            real = [o for o in options if o is not type(None)]
            if len(real) == 1:
                return self.value(real[0], value, path, supplied)
        if isinstance(hint, type):
            for slot, base in SLOTS.items():
                if issubclass(hint, base):
                    component, resolved, _ = self.component(slot, value, path, supplied)
                    if not isinstance(component, hint):
                        raise self.error(path, f"{type(component).__name__} is not a {hint.__name__}")
                    return component, resolved
        if hint in self.nested:
            if not isinstance(value, dict):
                raise self.error(path, f"expected a mapping, got {_describe(value)}")
            kwargs, resolved = self.arguments(hint, value, path, supplied, path)
            return self.construct(hint, kwargs, path), resolved
        if value is None:
            raise self.error(path, f"expected {_hint_name(hint)}, got null")
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if origin is tuple and isinstance(value, list):
            element = _component_elements(hint)
            if element is not None:
                built = [
                    self.value(element, item, f"{path}[{index}]", supplied)
                    for index, item in enumerate(value)
                ]
                return tuple(b for b, _ in built), [shown for _, shown in built]
            value = tuple(value)
        if origin is Literal:
            allowed = typing.get_args(hint)
            if value not in allowed:
                raise self.error(
                    path, f"{value!r} is not one of: {', '.join(repr(a) for a in allowed)}"
                )
            return value, value
        if hint is not Any and not is_bearable(value, hint, conf=_TOWER):
            extra = ""
            if isinstance(value, bool) and hint is str:
                extra = " (quote the value to make it a string)"
            if isinstance(value, str) and hint in (float, int):
                extra = " (write a number without quotes)"
            raise self.error(path, f"expected {_hint_name(hint)}, got {_describe(value)}{extra}")
        return value, _plain(value)


def _join(section: str, relative: str | None) -> str:
    """The dotted path of ``relative`` (a key, ``key.sub`` or ``[i]``) inside ``section``."""
    if not relative:
        return section
    if not section:
        return relative
    return f"{section}{relative}" if relative.startswith("[") else f"{section}.{relative}"


def _component_elements(hint: Any) -> type | None:
    """The component protocol X of a ``tuple[X, ...]`` hint, else None."""
    arguments = typing.get_args(hint)
    if len(arguments) == 2 and arguments[1] is Ellipsis and isinstance(arguments[0], type):
        if any(issubclass(arguments[0], base) for base in SLOTS.values()):
            return arguments[0]
    return None


def constructor_hints(cls: type) -> dict[str, Any]:
    """The type hints of ``cls``'s constructor arguments by name, as the recipe builder
    checks a section's values against them (its own ``__init__``'s, else its dataclass
    fields'); empty when they cannot be resolved."""
    target = cls.__init__ if "__init__" in vars(cls) or not dataclasses.is_dataclass(cls) else cls
    try:
        return typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - hints are an aid; unresolvable ones are unchecked
        return {}


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return repr(value)


def build_component(
    slot: str,
    spec: str | Mapping[str, Any],
    *,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    num_classes: int | None = None,
    supplied: Mapping[str, Any] | None = None,
    registry: Registry | None = None,
    source: str = "<build_component>",
) -> Any:
    """Build one registered component from a recipe-style section, exactly as a recipe
    would: ``{"kind": name, **arguments}`` or just the name.

    The values ddiff derives from the data (``vocab_size``, ``seq_len``, ``num_classes``)
    come from the keywords or ``supplied``. A ``network`` section gives a
    :class:`NetworkSpec`, built later with its sizes and key.
    """
    derived = {"vocab_size": vocab_size, "seq_len": seq_len, "num_classes": num_classes}
    merged = {**{k: v for k, v in derived.items() if v is not None}, **dict(supplied or {})}
    builder = SectionBuilder(registry or default_registry(), source)
    component, _, _ = builder.component(slot, spec, slot, merged, build=slot != "network")
    return component
