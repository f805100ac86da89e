"""The recipes the benchmark times: a shape's own, and the shape's with one component
swapped in (a sampler or objective, in the first family of
:data:`~ddiff.runner.bench.shapes.FAMILIES` it pairs with)."""

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax

from ddiff._errors import DdiffError, IncompatibleComponentsError, RecipeError
from ddiff._registry import default_registry
from ddiff.runner.bench.shapes import FAMILIES, REQUIRED_SETTINGS, Shape
from ddiff.runner.model import model_shapes
from ddiff.runner.recipe import Recipe, apply_overrides, build_recipe


class BenchError(DdiffError):
    """A benchmark that cannot run as asked (unknown shape, a batch that does not fit)."""


def shape_recipe(
    shape: Shape, *, batch_size: int | None = None, overrides: Sequence[str] = ()
) -> Recipe:
    """The shape's recipe at ``batch_size`` (default: the shape's batch for the backend),
    with ``key.path=value`` overrides."""
    raw = dict(shape.recipe)
    default = shape.batch_size if jax.default_backend() == "cpu" else shape.accelerator_batch_size
    raw["trainer"] = {**raw["trainer"], "batch_size": batch_size or default}
    raw = apply_overrides(raw, overrides, "--set")
    return build_recipe(raw, source=f"bench shape {shape.name}")


def _variant(
    raw: dict[str, Any],
    family: dict[str, Any],
    slot: str,
    section: dict[str, Any],
    network: dict[str, Any],
) -> dict[str, Any]:
    """The recipe ``raw`` with a family's components (and its network kind, whose width,
    depth and heads are the shape's), the ``slot`` component ``section`` and ``network``
    settings."""
    base = raw["network"]
    if "network" in family and family["network"]["kind"] != base["kind"]:
        sizes = {key: base[key] for key in ("dim", "depth", "heads") if key in base}
        base = {**family["network"], **sizes}
    components = {key: value for key, value in family.items() if key != "network"}
    return {**raw, **components, slot: section, "network": {**base, **network}}


def component_recipe(raw: dict[str, Any], slot: str, section: dict[str, Any]) -> tuple[str, Recipe]:
    """The first family (the recipe's own, then
    :data:`~ddiff.runner.bench.shapes.FAMILIES`; each with its network,
    then with ``time_conditioned: false``) in which the ``slot`` component ``section``
    (``{"kind": ...}``) builds and pairs with every other component, as ``(family name,
    recipe)``; :class:`BenchError` listing the families tried when none does."""
    own = {key: raw[key] for key in ("process", "parameterization", "objective", "sampler")}
    section = {**REQUIRED_SETTINGS.get(section["kind"], {}), **section}
    tried = []
    for family_name, family in [("recipe", own), *FAMILIES.items()]:
        for network in ({}, {"time_conditioned": False}):
            name = family_name + ("" if not network else ", time-independent network")
            tried.append(name)
            try:
                recipe = build_recipe(_variant(raw, family, slot, section, network), source=name)
                model_shapes(recipe)
            except IncompatibleComponentsError:
                continue
            except RecipeError as error:
                if error.path is not None and error.path.split(".")[0] in (
                    "process",
                    "parameterization",
                    "objective",
                    "sampler",
                ):
                    continue
                raise
            return name, recipe
    raise BenchError(
        f"{slot} {section['kind']!r} pairs with none of the families tried ({'; '.join(tried)}); "
        f"add one it accepts to ddiff.runner.bench.FAMILIES"
    )


def sampler_section(name: str, shape: Shape, seq_len: int) -> dict[str, Any]:
    """The sampler ``name`` at the shape's sampling steps: ``steps`` when it has that
    setting, else ``tokens_per_call`` = length / steps when it has that one."""
    fields = {field.name for field in dataclasses.fields(default_registry().get("sampler", name))}
    section: dict[str, Any] = {"kind": name}
    if "steps" in fields:
        section["steps"] = shape.sample_steps
    elif "tokens_per_call" in fields:
        section["tokens_per_call"] = -(-seq_len // shape.sample_steps)
    return section
