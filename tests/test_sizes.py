"""Sizes that cannot fit in memory are refused in one line, before anything is allocated
(issue 32): the synthetic source's draws and transition table at recipe load, the
training step's parameters and activations before the run directory is touched."""

import equinox as eqx
import pytest

import ddiff

from ddiff.runner import load_recipe, main
from ddiff.runner.memory import check_training_fits, training_estimates
from ddiff.runner.model import initial_model

from conftest import TINY_OVERRIDES

QUICKSTART = "recipes/quickstart.yaml"


def _one_line(capsys, status, expected):
    captured = capsys.readouterr()
    assert status == 2, captured
    assert captured.err.startswith("ddiff: error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err and expected in captured.err, captured.err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.length=1000000000", "data.length: drawing 20000 sequences of 1000000000 tokens needs about"),
        ("data.num_train=100000000000", "data.num_train: drawing 100000000000 sequences"),
        ("data.num_symbols=1000000000", "data.num_symbols: the 1000000000 x 1000000000 transition matrix"),
        ("data.num_symbols=1000000", "more than this machine's"),
    ],
)
def test_recipe_show_refuses_data_that_cannot_fit(capsys, override, expected):
    _one_line(capsys, main(["recipe", "show", QUICKSTART, override]), expected)


def test_run_refuses_a_network_that_cannot_fit_before_the_run_directory(capsys, tmp_path):
    workdir = tmp_path / "run"
    status = main(["run", QUICKSTART, "--workdir", str(workdir), *TINY_OVERRIDES, "network.dim=10000000"])
    _one_line(capsys, status, "network.dim: training needs at least")
    assert not workdir.exists()


def test_the_estimate_names_the_part_that_dominates(tiny_recipe):
    shapes = eqx.filter_eval_shape(initial_model, tiny_recipe)
    estimates = training_estimates(tiny_recipe, shapes)
    check_training_fits(tiny_recipe, shapes, sum(estimate.count for estimate in estimates))
    with pytest.raises(ddiff.RecipeError, match="trainer.batch_size: training needs at least .* is activations"):
        recipe = load_recipe(QUICKSTART, [*TINY_OVERRIDES, "trainer.batch_size=100000000", "network.dim=64"])
        check_training_fits(recipe, eqx.filter_eval_shape(initial_model, recipe))
