"""Runs that survive: SIGKILL and SIGTERM, damaged checkpoints, non-finite steps, and
hostile recipes."""

import dataclasses
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ddiff
import ddiff.runner
from ddiff.runner import main

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _arrays(state):
    return [np.asarray(a) for a in jax.tree.leaves(eqx.filter(state, eqx.is_array))]


def _assert_bitwise_equal(a, b):
    for x, y in zip(_arrays(a), _arrays(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def long_recipe(tiny_overrides):
    """The tiny recipe with 40 steps and a checkpoint every 5, so kills land mid-run."""
    overrides = (*tiny_overrides, "trainer.steps=40", "trainer.checkpoint_every=5", "trainer.log_every=5", "trainer.final_eval=false", "trainer.num_samples=0")
    return ddiff.runner.load_recipe("recipes/quickstart.yaml", overrides)


@pytest.fixture(scope="module")
def long_reference(long_recipe, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    return ddiff.runner.Trainer(long_recipe, workdir, show_progress=False).run()


def _start(recipe_file: Path, workdir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ddiff", "run", str(recipe_file), "--workdir", str(workdir)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _complete_steps(workdir: Path) -> set[int]:
    directory = workdir / "checkpoints"
    if not directory.exists():
        return set()
    return {int(p.name) for p in directory.iterdir() if p.name.isdigit()}


def _wait_for_new_checkpoint(process, workdir: Path, before: set[int], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if _complete_steps(workdir) - before:
            return
        time.sleep(0.05)


def test_sigkill_at_a_random_moment_then_sigterm_then_resume_is_bitwise(long_recipe, long_reference, tmp_path):
    """One run killed (SIGKILL) at a random moment after its first checkpoint; restarted,
    it resumes and is stopped by SIGTERM, which saves the step it stopped at and exits
    128 + 15 with one line; resumed again (in this process) it ends bit for bit where the
    uninterrupted run ends, with no temporary checkpoint left behind."""
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(long_recipe.to_yaml())
    workdir = tmp_path / "run"
    process = _start(recipe_file, workdir)
    _wait_for_new_checkpoint(process, workdir, set())
    time.sleep(random.Random(0).uniform(0.0, 0.3))
    assert process.poll() is None, "the run finished before the kill; the test did not exercise a crash"
    process.send_signal(signal.SIGKILL)
    process.communicate()

    process = _start(recipe_file, workdir)
    _wait_for_new_checkpoint(process, workdir, _complete_steps(workdir))
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    if process.returncode == 0:
        _, state = ddiff.runner.load_run(workdir)
        assert int(state.step) == 40
        _assert_bitwise_equal(state, long_reference)
        pytest.skip("the resumed run finished before SIGTERM arrived (the SIGKILL resume was checked)")
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM at step" in err and "Traceback" not in err
    stopped_at = int(err.split("at step ")[1].split(";")[0])
    assert stopped_at in _complete_steps(workdir), "SIGTERM must leave a checkpoint of the step it stopped at"

    resumed = ddiff.runner.Trainer(long_recipe, workdir, show_progress=False).run()
    assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
    assert int(resumed.step) == 40
    _assert_bitwise_equal(resumed, long_reference)


def _step_files(workdir: Path, step: int) -> list[Path]:
    return sorted(p for p in (workdir / "checkpoints" / str(step) / "state").rglob("*") if p.is_file() and p.parent.name == "d")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_is_named_and_previous_one_used(full_run, tiny_recipe, tmp_path, capsys, damage):
    source, _ = full_run
    workdir = tmp_path / "copy"
    import shutil

    shutil.copytree(source, workdir)
    victim = _step_files(workdir, 6)[0]
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:
        victim.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    _, state = ddiff.runner.load_run(workdir)
    err = capsys.readouterr().err
    assert f"checkpoint 6 in {workdir / 'checkpoints'} is damaged" in err
    assert str(victim) in err
    assert int(state.step) == 4


def test_no_restorable_checkpoint_stops_with_instruction(full_run, tmp_path):
    import shutil

    source, _ = full_run
    workdir = tmp_path / "copy"
    shutil.copytree(source, workdir)
    for step in _complete_steps(workdir):
        _step_files(workdir, step)[0].write_bytes(b"")
    with pytest.raises(ddiff.runner.RunDirectoryError, match="move that directory aside"):
        ddiff.runner.load_run(workdir)


def test_temporary_checkpoint_directories_are_removed_and_never_loaded(full_run, tiny_recipe, tmp_path):
    import shutil

    source, reference = full_run
    workdir = tmp_path / "copy"
    shutil.copytree(source, workdir)
    fake = workdir / "checkpoints" / "8.orbax-checkpoint-tmp-1700000000000000"
    fake.mkdir()
    (fake / "garbage").write_text("partial")
    state = ddiff.runner.Trainer(tiny_recipe, workdir, show_progress=False).run()
    assert not fake.exists()
    _assert_bitwise_equal(state, reference)


def test_checkpoints_hold_no_pickles(full_run):
    workdir, _ = full_run
    for path in (workdir / "checkpoints").rglob("*"):
        if path.is_file():
            with pytest.raises(Exception):  # noqa: B017 - any failure: not a pickle
                pickle.loads(path.read_bytes())


def _poisoned(engine):
    state = engine.init_state()
    head = state.model.network.head.weight
    return eqx.tree_at(lambda s: s.model.network.head.weight, state, head.at[0, 0].set(jnp.nan))


def test_nan_parameter_halts_with_report(tiny_recipe, tmp_path, monkeypatch):
    trainer = ddiff.runner.Trainer(tiny_recipe, tmp_path, show_progress=False)
    monkeypatch.setattr(trainer.engine, "init_state", lambda: _poisoned(ddiff.runner.Engine(tiny_recipe)))
    with pytest.raises(ddiff.DdiffError) as info:
        trainer.run()
    message = str(info.value)
    assert message.startswith("step 1: non-finite loss, nelbo, diffusion")
    assert "non-finite parameters: .network.head.weight;" in message
    assert "non-finite gradients in" in message and "on_nonfinite=skip" in message


class _FragileObjective(ddiff.AbstractObjective):
    """The MD4 ELBO, made NaN by any batch example whose first token is 0."""

    inner: ddiff.AbstractObjective

    def example_terms(self, model, x0, t, *, key, label=None, train=True):
        terms = self.inner.example_terms(model, x0, t, key=key, label=label, train=train)
        poison = jnp.where(x0[0] == 0, jnp.nan, 0.0)
        return ddiff.ObjectiveTerms(loss=terms.loss + poison, nelbo=terms.nelbo, metrics=terms.metrics)


def test_nan_from_a_batch_is_skipped_and_counted(tiny_recipe, tmp_path):
    recipe = dataclasses.replace(
        tiny_recipe,
        objective=_FragileObjective(tiny_recipe.objective),
        trainer=dataclasses.replace(tiny_recipe.trainer, on_nonfinite="skip", final_eval=False, num_samples=0),
    )
    state = ddiff.runner.Trainer(recipe, tmp_path, show_progress=False).run()
    iterator = ddiff.runner.train_batches(recipe.data, batch_size=recipe.trainer.batch_size, seed=recipe.seed)
    expected = sum(bool((next(iterator)["tokens"][:, 0] == 0).any()) for _ in range(recipe.trainer.steps))
    assert expected > 0, "the fixture must contain a poisoned batch"
    assert int(state.skipped_steps) == expected
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["skipped_steps"] == expected
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(eqx.filter(state.model, eqx.is_inexact_array)))


# ------------------------------------------------------------------ hostile recipes

_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=12)
)
_VALUES = st.recursive(
    _SCALARS, lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3), max_leaves=6
)
_KEYS = st.sampled_from(
    ["seed", "data", "data.kind", "data.length", "process", "process.schedule", "process.schedule.kind",
     "process.schedule.eps", "network.dim", "network.kind", "objective", "sampler.steps", "sampler.grid",
     "optimizer.learning_rate", "optimizer.grad_clip", "trainer.steps", "trainer.batch_size", "eval",
     "trainer.on_nonfinite", "bogus", "data.bogus.deeper", "parameterization.kind"]
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=_KEYS, value=_VALUES)
def test_hostile_overrides_end_in_one_line(key, value, capsys):
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    status = main(["recipe", "show", "recipes/quickstart.yaml", f"{key}={text}"])
    captured = capsys.readouterr()
    if status == 0:
        return
    assert status == 2
    assert captured.err.count("\n") == 1 and captured.err.startswith("ddiff: error: ")
    assert "Traceback" not in captured.err


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80) | _VALUES.map(lambda v: __import__("yaml").safe_dump(v)))
def test_hostile_recipe_files_end_in_one_line(text, tmp_path_factory, capsys):
    path = tmp_path_factory.mktemp("hostile") / "r.yaml"
    path.write_text(text)
    status = main(["recipe", "show", str(path)])
    captured = capsys.readouterr()
    assert status == 2
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_recipes_cannot_import_code(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {kind: 'os.system'}\n")
    with pytest.raises(ddiff.RecipeError, match="unknown data 'os.system'"):
        ddiff.runner.load_recipe(path)
