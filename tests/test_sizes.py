"""Sizes that cannot fit in memory are refused in one line, before anything is allocated
(issue 32): the synthetic source's draws and transition table and D3PM's transition tables
at recipe load, the training step's parameters and activations before the run directory
is touched; the random_tokens source takes any vocabulary (issue 26)."""

import math
import tracemalloc

import equinox as eqx
import numpy as np
import pytest
from conftest import TINY_OVERRIDES

import ddiff
from ddiff.runner import load_recipe, main
from ddiff.runner.memory import check_training_fits, training_estimates
from ddiff.runner.model import initial_model
from ddiff_plugins.d3pm import D3PMLinearSchedule, DiscretizedGaussianProcess
from ddiff_plugins.synthetic import MarkovChainSource, RandomTokenSource

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


D3PM_GAUSSIAN = "process={kind: discretized_gaussian, schedule: {kind: d3pm_linear, steps: 1000}}"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["data={kind: random_tokens, num_symbols: 100000}", D3PM_GAUSSIAN],
            "process.schedule.steps: building the 2001 transition tables of 100000 x 100000 (log Q_i and "
            "log Qbar_i for T = 1000 steps) needs about 146 TiB, more than this machine's",
        ),
        (
            ["data={kind: random_tokens, num_symbols: 100000}", D3PM_GAUSSIAN[:-1] + ", steps: 10}"],
            "process.steps: building the 21 transition tables",
        ),
    ],
)
def test_recipe_show_refuses_d3pm_tables_that_cannot_fit(capsys, overrides, expected):
    status = main(["recipe", "show", QUICKSTART, *overrides])
    _one_line(capsys, status, expected)


def _allocated_while(build):
    """The peak bytes Python and NumPy allocate while ``build()`` raises RecipeError, and
    the error."""
    tracemalloc.start()
    try:
        with pytest.raises(ddiff.RecipeError) as error:
            build()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, error.value


def test_tables_are_refused_before_anything_of_them_is_allocated():
    """A Markov chain over 10^6 symbols (44 TiB of work tables) and the 2001 Gaussian
    tables of a 10^5 vocabulary (146 TiB) are refused with less than 1 MiB allocated."""
    peak, error = _allocated_while(lambda: MarkovChainSource(num_symbols=10**6, num_train=8, num_eval=8))
    assert peak < 2**20 and error.path == "num_symbols"
    assert str(error).startswith("num_symbols: the 1000000 x 1000000 transition matrix needs about 43.7 TiB")
    assert str(error).endswith("lower num_symbols, or use data kind random_tokens (no table, any vocabulary)")
    schedule = D3PMLinearSchedule(steps=1000)
    peak, error = _allocated_while(lambda: DiscretizedGaussianProcess(schedule, vocab_size=10**5))
    assert peak < 2**20 and error.path == "schedule.steps"
    assert str(error).endswith("lower schedule.steps or the data's vocabulary (100000 values)")


def test_check_table_fits_counts_every_byte_against_physical_memory(monkeypatch):
    monkeypatch.setattr(ddiff._tables, "physical_memory_bytes", lambda: 1000)
    ddiff.check_table_fits((10, 25), 4, what="a table", path="size")
    with pytest.raises(ddiff.RecipeError) as error:
        ddiff.check_table_fits((10, 25), 4.004, what="a table", path="size")
    assert str(error.value) == "size: a table needs about 1001 B, more than this machine's 1000 B of memory; lower size"


def test_random_tokens_take_gpt2s_vocabulary_without_a_table():
    """Independent uniform tokens: exact entropy log2 V, log p(x) = -D log V, draws in
    range, fixed by the seed, different across splits; 50,257 symbols load at once."""
    source = RandomTokenSource(num_symbols=50257, length=16, num_train=300, num_eval=200, seed=3)
    assert source.reference_stats() == {"entropy_bits_per_token": math.log2(50257), "unigram_bits_per_token": math.log2(50257)}
    train, held_out = source.split("train").tokens, source.split("eval").tokens
    assert train.shape == (300, 16) and train.dtype == np.int32 and held_out.shape == (200, 16)
    assert 0 <= train.min() and train.max() < 50257 and len(np.unique(train)) > 4000
    again = RandomTokenSource(num_symbols=50257, length=16, num_train=300, num_eval=200, seed=3)
    np.testing.assert_array_equal(again.split("train").tokens, train)
    assert not np.array_equal(train[:200], held_out)
    np.testing.assert_array_equal(source.log_prob(train[:2]), [-16 * math.log(50257)] * 2)
    tiny = RandomTokenSource(num_symbols=2, length=4, num_train=4000, num_eval=8)
    assert abs(tiny.split("train").tokens.mean() - 0.5) < 0.02
