"""`ddiff sample` end to end on a tiny labelled toy: sample statistics beside every batch,
labels, guidance and infilling from the command line, and one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest

import ddiff
import ddiff.runner
from ddiff.runner import main
from ddiff.runner.sample_options import SampleOptions, build_conditioning, given_tokens

RECIPE = """
seed: 0
data: {kind: toy, toy: classes, num_train: 64, num_eval: 16}
process: {kind: masked, schedule: {kind: poly, power: 2}}
parameterization: {kind: mean}
network: {kind: transformer, dim: 8, depth: 1, heads: 2, time_conditioned: false}
objective: {kind: md4_discrete_elbo, steps: 50}
sampler: {kind: cached, steps: 8, grid: cosine}
trainer: {steps: 2, batch_size: 8, log_every: 1, checkpoint_every: 2, num_samples: 4, final_eval: false}
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """An untrained run (``--stop-at-step 0`` checkpoints the initial state)."""
    directory = tmp_path_factory.mktemp("cli")
    recipe = directory / "toy.yaml"
    recipe.write_text(RECIPE)
    assert main(["run", str(recipe), "--workdir", str(directory / "run"), "--stop-at-step", "0"]) == 0
    return directory / "run"


def test_sample_with_label_guidance_and_prefix(run_dir, capsys):
    code = main(
        ["sample", str(run_dir), "--num", "6", "--label", "1", "--guidance", "2", "--prefix", "2 1", "--name", "a"]
    )
    assert code == 0, capsys.readouterr().err
    tokens = np.load(run_dir / "samples" / "a.npy")
    assert tokens.shape == (6, 4) and np.all(tokens[:, :2] == [2, 1])
    stats = json.loads((run_dir / "samples" / "a.json").read_text())
    assert stats["conditioning"] == {"label": 1, "guidance": 2.0, "num_fixed_positions": 12}
    assert {"unigram_entropy_bits", "num_function_evals", "num_samples", "sampler"} <= set(stats)
    # Guidance: two network calls per prediction; cached: at most 8 steps + the final decode.
    assert stats["num_function_evals"] % 2 == 0 and 2 <= stats["num_function_evals"] <= 18
    assert "network evaluations" in capsys.readouterr().out


def test_fixed_file_gives_tokens_and_mask(tmp_path):
    """--fixed FILE.npy: ids >= 0 are given, -1 free; one row is broadcast to every sample.
    (Sampling with given positions runs end to end in the test above.)"""
    fixed = tmp_path / "fixed.npy"
    rows = np.asarray([[-1, 0, -1, 2], [1, -1, -1, -1], [-1, -1, -1, -1]])
    np.save(fixed, rows)
    options = SampleOptions(fixed=str(fixed))
    tokens, mask = given_tokens(options, 3, 4, 3)
    np.testing.assert_array_equal(mask, rows >= 0)
    np.testing.assert_array_equal(tokens[mask], rows[rows >= 0])
    np.save(fixed, rows[0])
    tokens, mask = given_tokens(options, 5, 4, 3)
    assert tokens.shape == (1, 4) and mask.sum() == 2, "one row, the same for every sample"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--label", "2"], "--label must be in 0..1, got 2"),
        (["--guidance", "1.0"], "--guidance needs --label"),
        (["--prefix", "1 2 3 4 5"], "--prefix needs 1 to 4 token ids, got 5"),
        (["--prefix", "1 x"], "is not a list of token ids"),
        (["--prefix", "7"], "given token ids must be in 0..2"),
        (["--fixed", "missing.npy"], "cannot read a .npy array"),
    ],
)
def test_sample_errors_are_one_line(run_dir, capsys, arguments, message):
    assert main(["sample", str(run_dir), *arguments]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and "Traceback" not in error


def test_fixed_file_with_the_wrong_shape(run_dir, tmp_path, capsys):
    fixed = tmp_path / "wrong.npy"
    np.save(fixed, np.zeros((2, 3), np.int64))
    assert main(["sample", str(run_dir), "--num", "4", "--fixed", str(fixed)]) == 2
    assert "expected (4,) or (4, 4)" in capsys.readouterr().err


def test_label_needs_a_class_conditional_model():
    raw = {
        "data": {"kind": "toy", "toy": "markov", "num_train": 8, "num_eval": 8},
        "process": {"kind": "masked", "schedule": "linear"},
        "parameterization": "mean",
        "network": {"kind": "transformer", "dim": 8, "depth": 1, "heads": 2},
        "objective": "md4_elbo",
        "sampler": "ancestral",
    }
    recipe = ddiff.runner.build_recipe(raw, source="markov.yaml")
    with pytest.raises(ddiff.RecipeError, match="needs a class-conditional model"):
        build_conditioning(SampleOptions(label=0), recipe, 4)


def test_cached_sampler_refused_when_loading_a_time_conditioned_run(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(RECIPE.replace("time_conditioned: false", "time_conditioned: true"))
    assert main(["run", str(recipe), "--workdir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert "sampler 'cached' cannot be used with network 'transformer'" in error
    assert error.count("\n") == 1
    assert not (Path(tmp_path / "run") / "checkpoints").exists()
