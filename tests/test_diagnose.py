"""`ddiff diagnose`: several objectives on the same network, data and keys, from a run
directory or a recipe; incompatible or unknown objectives refused in one line."""

import json

import numpy as np

from ddiff.runner import main


def test_diagnose_a_run_compares_objectives_on_the_same_draws(full_run, capsys):
    """On the tiny trained run (32 eval sequences, 2 batches of 16, 2 draws each): the same
    objective given twice differs by exactly 0 (same data, times and noise); every
    statistic is reported and written to DIR/diagnose.json."""
    workdir, state = full_run
    arguments = [
        "diagnose", str(workdir), "--batches", "2", "--repeats", "2",
        "--objective", "md4_elbo", "--objective", "{kind: md4_elbo}",
        "--objective", "{kind: md4_discrete_elbo, steps: 10}",
    ]  # fmt: skip
    assert main(arguments) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "at step 6 (EMA parameters)" in out and "{kind: md4_discrete_elbo, steps: 10} - md4_elbo:" in out
    result = json.loads((workdir / "diagnose.json").read_text())
    assert (result["num_sequences"], result["num_batches"], result["repeats"]) == (32, 2, 2)
    objectives = result["objectives"]
    assert list(objectives) == ["md4_elbo", "{kind: md4_elbo}", "{kind: md4_discrete_elbo, steps: 10}"]
    same = objectives["{kind: md4_elbo}"]
    assert same["difference"]["mean"] == 0.0 and same["mean"] == objectives["md4_elbo"]["mean"]
    for entry in objectives.values():
        for key in ("mean", "stderr", "per_example_std", "per_batch_std", "estimator_std"):
            assert np.isfinite(entry[key]) and entry[key] >= 0, (key, entry)
        assert {"diffusion", "reconstruction", "prior"} <= set(entry["terms"])
        assert entry["per_example_std"] >= entry["estimator_std"] * 0.5


def test_diagnose_an_untrained_recipe(tiny_overrides, tmp_path, capsys):
    output = tmp_path / "d.json"
    arguments = ["diagnose", "recipes/quickstart.yaml", *tiny_overrides, "--objective", "md4_elbo", "--batches", "1", "--output", str(output)]
    assert main(arguments) == 0, capsys.readouterr().err
    result = json.loads(output.read_text())
    assert "untrained" in result["model"] and result["num_sequences"] == 16
    assert result["objectives"]["md4_elbo"]["estimator_std"] is None


def test_diagnose_refuses_in_one_line(tiny_overrides, tmp_path, capsys):
    uniform = (*tiny_overrides, "process.kind=uniform", "parameterization.kind=x0", "objective.kind=campbell_elbo", "sampler.kind=tau_leaping")
    cases = [
        ([*uniform, "--objective", "md4_elbo"], "objective 'md4_elbo' cannot be used with process 'uniform': it needs capability masked"),
        ([*tiny_overrides, "--objective", "md4_elbbo"], "did you mean 'md4_elbo'"),
        ([*tiny_overrides, "--objective", "[1, 2]"], "is neither an objective name nor a mapping with a 'kind'"),
        ([*tiny_overrides, "--objective", "{kind: campbell_elbo, weighting: {kind: bound, cross_entropy: -1}}"], "objective.weighting.cross_entropy: cross_entropy must be >= 0"),
    ]
    for extra, message in cases:
        assert main(["diagnose", "recipes/quickstart.yaml", *extra]) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error
    assert main(["diagnose", str(tmp_path / "nothing"), "--objective", "md4_elbo"]) == 2
    assert "no such run directory or recipe file" in capsys.readouterr().err
