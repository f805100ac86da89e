"""The D3PM paper recipes: each opens with the paper's numbers, loads as written, and
runs 2 steps through the command line on small files in the real formats (shrunk by
overrides, as tests/test_paper_recipes.py does for MD4)."""

import math

import pytest
import yaml
from data_fixtures import write_cifar10, write_text8
from test_paper_recipes import RECIPES, SMALL_TRANSFORMER, SMALL_UNET, _eval_json, _run

PAPER_NUMBERS = {
    "d3pm_absorbing_text8": ("1.45", "L_lambda=0.01"),
    "d3pm_gaussian_cifar10": ("3.435", "FID 7.34", "IS 8.56", "L_lambda=0.001"),
}


@pytest.mark.parametrize("name", list(PAPER_NUMBERS))
def test_d3pm_recipe_opens_with_the_paper_result_and_trains_on_the_hybrid_loss(name):
    """The header and the objective as written; that each recipe loads (the Gaussian one
    builds 2 x 1000 tables of 256 x 256) is tests/test_recipe.py's test_every_recipe_loads."""
    text = (RECIPES / f"{name}.yaml").read_text()
    header = text.split("\n\n")[0]
    assert text.startswith("# D3PM") and "Paper" in header
    assert all(number in header for number in PAPER_NUMBERS[name]), name
    objective = yaml.safe_load(text)["objective"]
    assert objective["kind"] == "d3pm_vb" and objective["steps"] == 1000
    assert objective["hybrid_weight"] == (0.01 if "text8" in name else 0.001)


@pytest.mark.slow
def test_d3pm_text8_recipe(tmp_path, capsys):
    """The absorbing family on text8; one sampling step (decoded straight from mu)."""
    write_text8(tmp_path / "data", characters=4000)
    out = _run(
        capsys, "d3pm_absorbing_text8", tmp_path / "run", f"data.root={tmp_path / 'data'}", "data.length=32",
        *SMALL_TRANSFORMER, "sampler.steps=1",
    )  # fmt: skip
    assert "d3pm_vb with masked process" in out and "(V=27, D=32)" in out
    assert 3.0 < _eval_json(tmp_path / "run")["bits_per_char"] < 12.0
    samples = (tmp_path / "run" / "samples" / "step_00000002.txt").read_text().splitlines()
    assert len(samples) == 4 and all(
        len(s) == 32 and set(s) <= set("abcdefghijklmnopqrstuvwxyz ") for s in samples
    )


@pytest.mark.slow
def test_d3pm_cifar10_recipe(tmp_path, capsys):
    """The Gaussian family with the logistic on CIFAR-10, tables for 8 steps, one test
    image, batches of one. No samples: the exact reverse step costs V^2 exponentials per
    sub-pixel on a CPU; the Gaussian reverse step d3pm_ancestral takes is checked exactly
    on V = 16 in test_d3pm.py, and the CIFAR-10 sample grid in test_paper_recipes.py."""
    write_cifar10(tmp_path / "data", per_batch=2, test=1)
    out = _run(
        capsys, "d3pm_gaussian_cifar10", tmp_path / "run", f"data.root={tmp_path / 'data'}", "data.download=false",
        *SMALL_UNET, "process.schedule.steps=8", "objective.steps=8", "eval.time_draws=1", "trainer.num_samples=0",
        "trainer.batch_size=1",
    )  # fmt: skip
    assert "discretized_gaussian process, discretized_logistic parameterization" in out
    result = _eval_json(tmp_path / "run")
    assert (
        result["num_sequences"] == 1
        and math.isfinite(result["bits_per_dim"])
        and result["bits_per_dim"] > 0
    )
