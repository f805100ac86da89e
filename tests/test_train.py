"""Training end to end: a short run, bitwise resume, run-directory safety, the CLI."""

import json
import os
import subprocess
import sys

import equinox as eqx
import jax
import numpy as np
import pytest

import ddiff
import ddiff.runner
from ddiff.runner import main


def _arrays(state):
    return [np.asarray(a) for a in jax.tree.leaves(eqx.filter(state, eqx.is_array))]


def test_run_writes_metrics_eval_samples_and_checkpoints(full_run, tiny_recipe):
    workdir, state = full_run
    assert int(state.step) == 6
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if line["split"] == "train"]
    assert [line["step"] for line in train] == [2, 4, 6]
    assert all(np.isfinite(line["loss"]) and line["tokens_per_second"] > 0 for line in train)
    result = json.loads((workdir / "eval.json").read_text())
    for key in ("bits_per_token", "bits_per_token_stderr", "num_tokens", "entropy_bits_per_token", "unigram_bits_per_token"):
        assert key in result
    assert result["num_tokens"] == 32 * 8
    samples = workdir / "samples"
    stats = json.loads((samples / "step_00000006.json").read_text())
    assert stats["num_function_evals"] >= 4 and "unigram_entropy_bits" in stats
    assert len((samples / "step_00000006.txt").read_text().splitlines()) == 4
    assert (workdir / "recipe.yaml").read_text() == tiny_recipe.to_yaml()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6"] or "6" in os.listdir(workdir / "checkpoints")


def test_stop_and_resume_is_bitwise_identical(full_run, tiny_recipe, tmp_path):
    _, uninterrupted = full_run
    stopped = ddiff.runner.Trainer(tiny_recipe, tmp_path, show_progress=False).run(stop_at_step=3)
    assert int(stopped.step) == 3
    assert not (tmp_path / "eval.json").exists()
    resumed = ddiff.runner.Trainer(tiny_recipe, tmp_path, show_progress=False).run()
    assert int(resumed.step) == 6
    for a, b in zip(_arrays(uninterrupted), _arrays(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(2) == 1, "a resumed run must not duplicate metrics"


def test_other_recipe_is_refused_without_touching_checkpoints(full_run, tiny_overrides):
    workdir, _ = full_run
    before = {p: p.stat().st_mtime_ns for p in (workdir / "checkpoints").rglob("*")}
    other = ddiff.runner.load_recipe("recipes/quickstart.yaml", (*tiny_overrides, "optimizer.learning_rate=0.5"))
    with pytest.raises(ddiff.runner.RunDirectoryError, match="optimizer.learning_rate"):
        ddiff.runner.Trainer(other, workdir, show_progress=False).run()
    after = {p: p.stat().st_mtime_ns for p in (workdir / "checkpoints").rglob("*")}
    assert before == after


def test_eval_and_sample_commands(full_run, capsys):
    workdir, _ = full_run
    assert main(["eval", str(workdir)]) == 0
    written = capsys.readouterr().err.split("wrote ")[1].strip()
    result = json.loads(open(written).read())
    assert written.startswith(str(workdir / "eval_step00000006"))
    assert result["step"] == 6 and result["bits_per_token_stderr"] > 0
    assert main(["sample", str(workdir), "--num", "3", "--steps", "2", "--name", "cli"]) == 0
    assert len((workdir / "samples" / "cli.txt").read_text().splitlines()) == 3
    assert json.loads((workdir / "samples" / "cli.json").read_text())["num_function_evals"] in (2, 3)
    capsys.readouterr()


def test_cli_plugins_and_recipe_show(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "md4_elbo" in out and "[plugin: md4]" in out
    assert main(["recipe", "show", "recipes/quickstart.yaml", "trainer.steps=11"]) == 0
    assert "steps: 11" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["run", "recipes/quickstart.yaml", "trainer.steps=abc"], "trainer.steps: expected int"),
        (["run", "missing.yaml"], "no such recipe file"),
        (["run", "recipes/quickstart.yaml", "process.kind=maskd"], "did you mean 'masked'"),
        (["eval", "not-a-run-dir"], "not a ddiff run directory"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args, fragment, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err


def test_console_entry_point_exit_status(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {kind: markov\n")
    result = subprocess.run(
        [sys.executable, "-m", "ddiff", "run", str(bad), "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"ddiff: error: {bad}: invalid YAML at line")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()


def test_data_location_and_length_may_change_on_resume_but_not_the_data():
    from ddiff.runner.trainer.rundir import recipe_differences

    saved = {"data": {"kind": "text8", "root": "/a"}, "trainer": {"steps": 5, "log_every": 1}}
    moved = {"data": {"kind": "text8", "root": "/b"}, "trainer": {"steps": 6, "log_every": 2}}
    assert recipe_differences(saved, moved) == []
    other = {"data": {"kind": "text8", "root": "/b", "length": 9}, "trainer": {"steps": 6, "log_every": 1}}
    assert recipe_differences(saved, other) == ["data.length"]
