"""Recipes: every shipped recipe loads; typed construction; one-line errors with paths."""

import glob

import jax
import jax.numpy as jnp
import pytest

import ddiff
import ddiff.runner
from ddiff.runner.recipe import parse_yaml

RECIPES = sorted(glob.glob("recipes/*.yaml"))


def test_recipes_exist():
    assert "recipes/quickstart.yaml" in RECIPES


@pytest.mark.parametrize("path", RECIPES)
def test_every_recipe_loads(path):
    recipe = ddiff.runner.load_recipe(path)
    assert recipe.resolved["objective"]["kind"] == recipe.names["objective"]
    again = ddiff.runner.build_recipe(parse_yaml(recipe.to_yaml(), path), source=path)
    assert again.resolved == recipe.resolved


def test_yaml_numbers_and_booleans():
    parsed = parse_yaml("a: 1e-4\nb: no\nc: true\nd: 3\ne: .5\nf: 2E+3", "x")
    assert parsed == {"a": 1e-4, "b": "no", "c": True, "d": 3, "e": 0.5, "f": 2000.0}
    assert isinstance(parsed["a"], float)


def test_duplicate_keys_are_refused():
    with pytest.raises(ddiff.RecipeError, match="duplicate key 'a'"):
        parse_yaml("a: 1\na: 2\n", "x.yaml")


def test_unsafe_yaml_is_refused():
    with pytest.raises(ddiff.RecipeError, match="x.yaml"):
        parse_yaml("a: !!python/object/apply:os.system ['true']", "x.yaml")


def test_resolved_recipe_has_defaults_and_typed_values(tiny_recipe):
    resolved = tiny_recipe.resolved
    assert resolved["process"]["schedule"] == {"kind": "cosine", "eps": 1e-4}
    assert isinstance(tiny_recipe.optimizer.learning_rate, float)
    assert tiny_recipe.process.vocab_size == 5


def _error(overrides, path="recipes/quickstart.yaml"):
    with pytest.raises(ddiff.RecipeError) as info:
        ddiff.runner.load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_path_and_accepted_keys():
    message = _error(["process.schedule.epsilon=0.1"])
    assert message.startswith("recipes/quickstart.yaml: process.schedule.epsilon:")
    assert "accepted: eps" in message


def test_unknown_kind_suggests_closest():
    message = _error(["objective.kind=md4_elbow"])
    assert "objective.kind" in message and "did you mean 'md4_elbo'?" in message


def test_wrong_types_are_explained():
    assert "expected int" in _error(["trainer.steps=lots"])
    assert "write a number without quotes" in _error(["optimizer.learning_rate='1e-3'"])
    assert "'uniform', 'cosine'" in _error(["sampler.grid=linear"])
    assert "must be >= 1" in _error(["trainer.steps=0"])


def test_component_errors_are_relative_to_their_section(tiny_overrides):
    """A component names only its own key; the builder prefixes where the section lies."""
    objective = "{kind: md4_discrete_elbo, steps: 0}"
    assert "recipes/quickstart.yaml: objective.steps: steps must be >= 1, got 0" in _error([f"objective={objective}"])
    under_eval = _error([f"eval.objectives=[md4_elbo, {objective}]"])
    assert "recipes/quickstart.yaml: eval.objectives[1].steps: steps must be >= 1, got 0" in under_eval
    assert "process.schedule.eps: eps must be in [0, 0.5)" in _error(["process.schedule.eps=0.7"])
    assert "optimizer.schedule.weight_decay: weight_decay must be >= 0" in _error(["optimizer.schedule={weight_decay: -1}"])
    recipe = ddiff.runner.load_recipe("recipes/quickstart.yaml", [*tiny_overrides, "network.heads=3"])
    with pytest.raises(ddiff.RecipeError, match=r"^network: dim=16 must be a multiple of heads=3"):
        ddiff.runner.build_model(recipe, jax.random.PRNGKey(0))


def test_supplied_keys_cannot_be_set():
    assert "set by ddiff" in _error(["process.vocab_size=7"])
    assert "set by ddiff" in _error(["network.num_outputs=7"])


def test_unknown_section_and_bad_override():
    assert "unknown section" in _error(["trainr.steps=3"])
    with pytest.raises(ddiff.RecipeError, match="key.path=value"):
        ddiff.runner.load_recipe("recipes/quickstart.yaml", ["trainer.steps"])
    assert "is a value, not a section" in _error(["seed.x=1"])


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(ddiff.RecipeError, match="no such recipe file"):
        ddiff.runner.load_recipe(tmp_path / "nope.yaml")


def test_overrides_apply_and_parse_as_yaml():
    recipe = ddiff.runner.load_recipe(
        "recipes/quickstart.yaml", ["trainer.steps=7", "optimizer.learning_rate=3e-4", "process.schedule=linear"]
    )
    assert recipe.trainer.steps == 7
    assert recipe.optimizer.learning_rate == 3e-4
    assert recipe.names["process"] == "masked"
    assert recipe.resolved["process"]["schedule"]["kind"] == "linear"


class _ScoreOnly(ddiff.AbstractScoreParameterization):
    """A parameterization that gives scores but no mean (to test the refusal)."""

    def output_channels(self, process):
        return process.num_states

    def log_score(self, output, x_t, t, process):
        return output


class _ScorePlugin:
    @ddiff.hookimpl
    def ddiff_register_components(self, registry):
        registry.register("parameterization", "score_only", _ScoreOnly)


def test_incompatible_pairing_is_refused_at_load_time():
    manager = ddiff.make_plugin_manager(plugins=[_ScorePlugin()])
    registry = ddiff.build_registry(manager)
    raw = ddiff.runner.read_recipe_file("recipes/quickstart.yaml")
    raw = ddiff.runner.apply_overrides(raw, ["parameterization.kind=score_only"], "q")
    with pytest.raises(ddiff.IncompatibleComponentsError) as info:
        ddiff.runner.build_recipe(raw, source="q.yaml", registry=registry)
    message = str(info.value)
    assert "'md4_elbo'" in message and "'score_only'" in message and "mean" in message


def test_build_component_with_supplied_values():
    process = ddiff.build_component(
        "process", {"kind": "masked", "schedule": {"kind": "linear"}}, supplied={"vocab_size": 3}
    )
    assert process.num_states == 4
    assert jnp.allclose(process.prior_probs().sum(), 1.0)
