"""Recipe files: safe YAML, command-line overrides, and the typed :class:`Recipe` built
from them (components through :class:`ddiff.SectionBuilder`, the trainer's sections
through :mod:`ddiff.runner.config`), checked at load time.

Values ddiff derives itself (the vocabulary size from the data, the network's input and
output sizes) are never written in a recipe. Every error names the file, the dotted key
path and what is accepted.
"""

import dataclasses
import inspect
import os
import re
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ddiff._builder import NetworkSpec, SectionBuilder
from ddiff._capabilities import check_compatibility
from ddiff._data import AbstractDataSource
from ddiff._errors import RecipeError
from ddiff._objective import AbstractObjective
from ddiff._parameterization import AbstractParameterization
from ddiff._process import AbstractForwardProcess
from ddiff._registry import SLOTS, Registry, default_registry
from ddiff._sampler import AbstractSampler
from ddiff.runner.config import (
    MAX_SEED,
    EvalConfig,
    LoggingConfig,
    OptimizerConfig,
    ParameterGroupConfig,
    PrecisionConfig,
    TrainerConfig,
)
from ddiff.runner.mesh import MeshConfig

# --------------------------------------------------------------------------- YAML


MAX_RECIPE_BYTES = 4 * 2**20
"""The largest recipe file read (4 MiB; the shipped recipes are a few KiB)."""

MAX_NODES = 100_000
"""The most values (mappings, lists, keys and scalars) a recipe or an override value
may hold once its YAML aliases are expanded (a billion-laughs alias bomb is refused)."""

MAX_DEPTH = 64
"""The deepest nesting of mappings and lists in a recipe, aliases expanded."""

_MAX_INTEGER_CHARACTERS = 80
"""Longer integer literals are refused before conversion (64 bits take at most 66)."""

_INTEGER_RANGE = (-(2**63), 2**64 - 1)
"""Recipe integers fit in 64 bits, signed or unsigned."""

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """Safe YAML with the YAML 1.2 core schema's numbers and booleans: ``1e-4`` is a
    float, ``no``/``on`` stay strings, duplicate keys are errors, merge keys (``<<:``)
    are taken, and nesting is bounded while the document is composed."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.level = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.level += 1
        try:
            if self.level > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} deep", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self.level -= 1


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose own keys are hashable and distinct (keys merged in by ``<<:`` may
    be set again, as YAML's merge keys allow)."""
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            repeated = key in seen
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"a {type(key).__name__} cannot be a key; keys are names", key_node.start_mark
            ) from None
        if repeated:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


def _construct_integer(loader: _Loader, node: yaml.ScalarNode) -> int:
    """An integer of at most 64 bits, its literal's length checked before conversion."""
    low, high = _INTEGER_RANGE
    if len(node.value) > _MAX_INTEGER_CHARACTERS:
        raise yaml.constructor.ConstructorError(
            None, None, f"an integer of {len(node.value)} characters; integers fit in 64 bits", node.start_mark
        )
    value = loader.construct_yaml_int(node)
    if not low <= value <= high:
        raise yaml.constructor.ConstructorError(
            None, None, f"integer {value} does not fit in 64 bits", node.start_mark
        )
    return value


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_integer)


def _check_expanded_size(node: yaml.Node) -> None:
    """Refuse a document of more than :data:`MAX_NODES` values or :data:`MAX_DEPTH`
    levels once its aliases are expanded, or one whose alias refers to a node that holds
    it, counting each shared node once (the work is the size of the text)."""
    measured: dict[int, tuple[int, int]] = {}
    open_nodes: set[int] = set()

    def refuse(problem: str, mark: Any) -> None:
        raise yaml.composer.ComposerError(None, None, problem, mark)

    def measure(node: yaml.Node, level: int) -> tuple[int, int]:
        known = measured.get(id(node))
        if known is not None:
            if level + known[1] - 1 > MAX_DEPTH:
                refuse(f"nested more than {MAX_DEPTH} deep once its aliases are expanded", node.start_mark)
            return known
        if id(node) in open_nodes:
            refuse("an alias refers to the list or mapping that holds it", node.start_mark)
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        open_nodes.add(id(node))
        size, height = 1, 1
        for child in children:
            child_size, child_height = measure(child, level + 1)
            size, height = size + child_size, max(height, child_height + 1)
            if size > MAX_NODES:
                refuse(
                    f"more than {MAX_NODES} values once its aliases are expanded (an alias bomb?)",
                    node.start_mark,
                )
        open_nodes.discard(id(node))
        measured[id(node)] = (size, height)
        return size, height

    measure(node, 1)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text safely; errors become one-line :class:`RecipeError`. Nesting and
    the size with aliases expanded are bounded (:data:`MAX_DEPTH`, :data:`MAX_NODES`);
    every list and mapping of the result is its own object (aliases are copies)."""
    loader = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node)
        return _deep_copy(loader.construct_document(node))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError(f"invalid YAML at {where}: {problem}", source=source) from None
    finally:
        if loader is not None:
            loader.dispose()


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """Read a recipe file into a plain mapping: a regular file (not a device or a FIFO)
    of at most :data:`MAX_RECIPE_BYTES`."""
    path = Path(path)
    source = str(path)
    try:
        data = _read_regular_file(path, MAX_RECIPE_BYTES)
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise RecipeError("no such recipe file; check the path", source=source) from None
    except IsADirectoryError:
        raise RecipeError("is a directory; give a recipe YAML file", source=source) from None
    except UnicodeDecodeError as error:
        raise RecipeError(
            f"not UTF-8 text (byte {error.start} cannot be decoded); a recipe is a YAML text file",
            source=source,
        ) from None
    except OSError as error:
        raise RecipeError(f"cannot read the recipe: {error.strerror}", source=source) from None
    raw = parse_yaml(text, source)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(
            f"a recipe is a mapping of sections, got {type(raw).__name__}", source=source
        )
    return raw


def _read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, refused (:class:`RecipeError`) unless it is a regular file
    of at most ``limit`` bytes; opened without blocking, so a FIFO never hangs."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(descriptor, "rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(mode):
            raise RecipeError(
                "is not a regular file (a device, FIFO or socket); give a recipe YAML file",
                source=str(path),
            )
        data = file.read(limit + 1)
    if len(data) > limit:
        raise RecipeError(
            f"larger than {limit // 2**20} MiB; a recipe is a short YAML text file", source=str(path)
        )
    return data


def apply_overrides(
    raw: dict[str, Any], overrides: Sequence[str], source: str, *, registry: Registry | None = None
) -> dict[str, Any]:
    """Apply ``dotted.path=value`` overrides (values parsed as YAML) to a copy of ``raw``.

    ``section=NAME`` or ``section={kind: NAME, key: value}`` replaces a whole section
    (``sampler=d3pm_ancestral``). ``section.kind=NAME`` naming another registered kind
    than the section has keeps the section's keys that NAME's class accepts and drops
    the others (the old kind's own settings); keys the command line sets in that section
    are always kept, whether they come before or after. A section written as a bare name
    (``schedule: cosine``) is read as ``{kind: cosine}`` when an override sets a key
    inside it. ``registry`` (default: the installed plugins) tells which keys a kind
    accepts."""
    result = _deep_copy(raw)
    parsed = [_parse_override(override) for override in overrides]
    for index, (parts, value) in enumerate(parsed):
        node = _parent(result, parts)
        if parts[-1] == "kind" and len(parts) > 1 and node.get("kind") != value:
            accepted = _accepted_keys(registry or default_registry(), parts[-2], value)
            if accepted is not None:
                for key in [key for key in node if key != "kind" and key not in accepted]:
                    del node[key]
                section = parts[:-1]
                for other, other_value in parsed[:index]:
                    if other[: len(section)] == section and len(other) > len(section):
                        _parent(result, other)[other[-1]] = other_value
        node[parts[-1]] = value
    del source
    return result


def _accepted_keys(registry: Registry, section: str, kind: Any) -> set[str] | None:
    """The constructor arguments of the component registered as ``kind`` (in the slot
    named like ``section`` when several slots have that name), or None when unknown."""
    if not isinstance(kind, str):
        return None
    slots = [slot for slot in SLOTS if kind in registry.names(slot)]
    if len(slots) > 1:
        slots = [slot for slot in slots if slot == section]
    if len(slots) != 1:
        return None
    parameters = inspect.signature(registry.get(slots[0], kind)).parameters.values()
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _parse_override(override: str) -> tuple[list[str], Any]:
    if "=" not in override:
        raise RecipeError(
            f"override {override!r} is not of the form key.path=value", source="command line"
        )
    dotted, text = override.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise RecipeError(f"override {override!r} has an empty key", source="command line")
    if len(parts) >= MAX_DEPTH:
        raise RecipeError(
            f"override {dotted[:40]!r}... is nested more than {MAX_DEPTH} deep", source="command line"
        )
    value = parse_yaml(text, "command line") if text.strip() else None
    return parts, value


def _parent(root: dict[str, Any], parts: list[str]) -> dict[str, Any]:
    """The mapping that holds ``parts[-1]``, creating sections on the way; a bare name
    on the way is a component section's short form and becomes ``{kind: name}``."""
    node = root
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str) and _is_component_name(child):
            child = node[part] = {"kind": child}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise RecipeError(
                f"cannot set {'.'.join(parts)}: {where} is a value, not a section",
                source="command line",
                path=".".join(parts),
            )
        node = child
    return node


def _is_component_name(name: str) -> bool:
    registry = default_registry()
    return any(name in registry.names(slot) for slot in SLOTS)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


# --------------------------------------------------------------------------- recipes


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A loaded, validated recipe: built components, configs and the resolved mapping.

    ``eval_objectives`` holds the objectives of ``eval.objectives`` by recipe path
    (``eval.objectives[i]``), each with its registered name, as
    :func:`ddiff.capabilities.check_compatibility` takes them."""

    data: AbstractDataSource
    process: AbstractForwardProcess
    parameterization: AbstractParameterization
    network: NetworkSpec
    objective: AbstractObjective
    sampler: AbstractSampler
    optimizer: OptimizerConfig
    trainer: TrainerConfig
    eval: EvalConfig
    mesh: MeshConfig
    precision: PrecisionConfig
    logging: LoggingConfig
    seed: int
    resolved: dict[str, Any]
    names: dict[str, str]
    source: str
    eval_objectives: dict[str, tuple[str, AbstractObjective]]

    def to_yaml(self) -> str:
        """The fully resolved recipe (every default filled in) as YAML."""
        return dump_yaml(self.resolved)


def dump_yaml(mapping: Mapping[str, Any]) -> str:
    """A mapping as block-style YAML, keys in their order."""
    return yaml.safe_dump(dict(mapping), sort_keys=False, default_flow_style=False)


_COMPONENT_SECTIONS = ("data", "process", "parameterization", "network", "objective", "sampler")
_CONFIG_SECTIONS = {
    "optimizer": OptimizerConfig,
    "trainer": TrainerConfig,
    "eval": EvalConfig,
    "mesh": MeshConfig,
    "precision": PrecisionConfig,
    "logging": LoggingConfig,
}
_SECTIONS = ("seed", *_COMPONENT_SECTIONS, *_CONFIG_SECTIONS)
_NESTED_CONFIGS = (ParameterGroupConfig,)
"""Config dataclasses that a config section may hold as a nested mapping."""


def build_recipe(
    raw: Mapping[str, Any], *, source: str = "<recipe>", registry: Registry | None = None
) -> Recipe:
    """Validate a recipe mapping and build its components; refuse incompatible pairings."""
    registry = registry or default_registry()
    builder = SectionBuilder(registry, source, nested=_NESTED_CONFIGS)
    for key in raw:
        if key not in _SECTIONS:
            raise builder.error(str(key), f"unknown section (accepted: {', '.join(_SECTIONS)})")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise builder.error("seed", f"expected an integer, got {builder.describe(seed)}")
    if not 0 <= seed <= MAX_SEED:
        raise builder.error("seed", f"must be in 0..{MAX_SEED}, got {seed}")
    resolved: dict[str, Any] = {"seed": seed}
    names: dict[str, str] = {}
    built: dict[str, Any] = {}
    context: dict[str, Any] = {}
    for slot in _COMPONENT_SECTIONS:
        component, shown, name = builder.component(
            slot, raw.get(slot), slot, context, build=slot != "network"
        )
        built[slot], resolved[slot], names[slot] = component, shown, name
        if slot == "data":
            context = {
                "vocab_size": component.vocab_size,
                "seq_len": component.seq_len,
                "num_classes": component.num_classes,
            }
    for section, cls in _CONFIG_SECTIONS.items():
        section_raw = raw.get(section) or {}
        if not isinstance(section_raw, dict):
            raise builder.error(section, f"expected a mapping, got {builder.describe(section_raw)}")
        kwargs, shown = builder.arguments(cls, section_raw, section, {}, section)
        built[section] = builder.construct(cls, kwargs, section)
        resolved[section] = shown
    components = {
        slot: (names[slot], built[slot])
        for slot in ("process", "parameterization", "objective", "sampler")
    }
    schedule_name = resolved["process"].get("schedule", {}).get("kind", "schedule")
    components["schedule"] = (schedule_name, built["process"].schedule)
    check_compatibility(components, source=source, deferred=("network",))
    extra = _eval_objectives(built["eval"], resolved["eval"])
    kinds = [name for name, _ in extra.values()]
    for path, (name, _) in extra.items():
        if kinds.count(name) > 1:
            raise builder.error(path, f"objective {name!r} is listed twice; keep one")
    check_compatibility({**components, **extra}, source=source, deferred=("network",))
    return Recipe(
        seed=seed,
        resolved=resolved,
        names=names,
        source=source,
        eval_objectives=extra,
        **{key: built[key] for key in (*_COMPONENT_SECTIONS, *_CONFIG_SECTIONS)},
    )


def _eval_objectives(
    config: EvalConfig, resolved: Mapping[str, Any]
) -> dict[str, tuple[str, AbstractObjective]]:
    """:attr:`Recipe.eval_objectives` of an ``eval`` section and its resolved mapping."""
    names = [section["kind"] for section in resolved.get("objectives", [])]
    return {
        f"eval.objectives[{index}]": (name, objective)
        for index, (name, objective) in enumerate(zip(names, config.objectives, strict=True))
    }


def load_recipe(
    path: str | Path, overrides: Sequence[str] = (), *, registry: Registry | None = None
) -> Recipe:
    """Read, override and build a recipe file."""
    raw = apply_overrides(read_recipe_file(path), overrides, str(path), registry=registry)
    return build_recipe(raw, source=str(path), registry=registry)
