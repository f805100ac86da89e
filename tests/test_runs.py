"""Runs and commands that never surprise: the run directory's lock, restarts and safe
resumes, `--fresh`, results never overwritten, batched sampling, the trainer's eval lines
and closing summary, the EMA's warm-up. (The command line's refusals are in
test_cli.py, the logging writers in test_logging.py.)"""

import json
import os
import shutil
import signal
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddiff
import ddiff.runner
from ddiff.runner import main
from ddiff.runner.trainer.optimizer import ema_decay_at
from ddiff.runner.trainer.rundir import (
    LOCK_FILE,
    RunLock,
    prepare_workdir,
    recipe_changes,
    resumable,
)

QUICKSTART = "recipes/quickstart.yaml"


def _recipe(tiny_overrides, *extra):
    return ddiff.runner.load_recipe(QUICKSTART, (*tiny_overrides, *extra))


def _one_line(capsys, status, expected):
    captured = capsys.readouterr()
    assert status == 2, captured
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    assert expected in captured.err, captured.err
    return captured.err


# --------------------------------------------------------------------------- the lock

HOLD = (
    "import sys\n"
    "from ddiff.runner.trainer.rundir import RunLock\n"
    "lock = RunLock(sys.argv[1]).acquire()\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"  # holds the lock until killed or its stdin closes
)


def test_a_second_process_is_refused_and_a_killed_one_leaves_no_lock(tiny_overrides, tmp_path, capsys):
    """Process A (a real second process) holds the lock; `ddiff run` here is refused in
    one line naming A's pid, before anything is built. After A is SIGKILLed (a crash), the
    directory can be locked at once."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(workdir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        status = main(["run", QUICKSTART, *tiny_overrides, "--workdir", str(workdir)])
        _one_line(capsys, status, f"{workdir} is in use by ddiff process {holder.pid} on ")
        assert not (workdir / "recipe.yaml").exists()
        with pytest.raises(ddiff.runner.RunDirectoryError, match="in use by"):
            RunLock(workdir).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    assert (workdir / LOCK_FILE).exists(), "the killed holder leaves its lock file behind"
    with RunLock(workdir):
        with pytest.raises(ddiff.runner.RunDirectoryError, match=f"ddiff process {os.getpid()}"):
            RunLock(workdir).acquire()
    RunLock(workdir).acquire().release()


# --------------------------------------------------------------------------- restarts and resumes


def test_a_run_without_checkpoint_restarts_with_a_changed_recipe(tiny_overrides, tmp_path, capsys):
    workdir = tmp_path / "run"
    first = _recipe(tiny_overrides, "optimizer.learning_rate=0.5")
    prepare_workdir(workdir, first).release()
    (workdir / "metrics.jsonl").write_text('{"step": 2, "split": "train", "loss": 1.0}\n')
    fixed = _recipe(tiny_overrides)
    prepare_workdir(workdir, fixed).release()
    assert "never reached a checkpoint; starting it afresh" in capsys.readouterr().out
    assert (workdir / "recipe.yaml").read_text() == fixed.to_yaml()
    # Once a checkpoint exists, a change outside the safe set is refused, naming every
    # differing key (more than five here) with both values.
    (workdir / "checkpoints" / "2").mkdir(parents=True)
    other = _recipe(
        tiny_overrides, "optimizer.learning_rate=0.5", "network.dim=8", "network.heads=1",
        "data.num_train=128", "seed=3", "optimizer.b1=0.8", "trainer.batch_size=4",
    )  # fmt: skip
    with pytest.raises(ddiff.runner.RunDirectoryError) as refused:
        prepare_workdir(workdir, other)
    message = str(refused.value)
    for change in ("optimizer.learning_rate (0.003 -> 0.5)", "network.dim (16 -> 8)", "network.heads",
                   "data.num_train", "seed (0 -> 3)", "optimizer.b1", "trainer.batch_size (8 -> 4)"):  # fmt: skip
        assert change in message, message
    assert "--fresh" in message and (workdir / "recipe.yaml").read_text() == fixed.to_yaml()
    RunLock(workdir).acquire().release()  # a refusal lets the lock go


def test_resume_accepts_the_documented_changes_only():
    assert all(resumable(key) for key in (
        "trainer.steps", "trainer.log_every", "trainer.eval_every", "trainer.checkpoint_every",
        "trainer.num_samples", "trainer.sample_batch_size", "trainer.on_nonfinite", "eval.time_draws",
        "eval.objectives[0].steps", "sampler.steps", "sampler.kind", "logging.wandb", "mesh.data",
        "data.root", "data.path",
    ))  # fmt: skip
    assert not any(resumable(key) for key in (
        "trainer.batch_size", "optimizer.learning_rate", "network.dim", "data.length", "seed",
        "objective.kind", "process.schedule.kind", "trainer.stepsize", "evaluation",
    ))  # fmt: skip
    saved = {"data": {"kind": "text8", "root": "/a"}, "trainer": {"steps": 5}}
    current = {"data": {"kind": "text8", "root": "/b"}, "trainer": {"steps": 6}, "logging": {"plot": True}}
    assert [str(c) for c in recipe_changes(saved, current)] == [
        "data.root (\"/a\" -> \"/b\")", "logging (absent -> {\"plot\": true})", "trainer.steps (5 -> 6)"
    ]


def test_resume_with_safe_changes_batched_samples_eval_lines_and_summary(full_run, tiny_overrides, tmp_path, capsys):
    """The tiny run resumed from its step-4 checkpoint with safe changes (a periodic eval,
    5 samples at the end drawn in batches of 2) trains steps 5 and 6 only, prints the eval
    line and a closing summary, and its batched samples equal one batch of 5. (Extending
    trainer.steps works the same way; it only recompiles the step for the new learning
    rate decay, which this test avoids.)"""
    source, _ = full_run
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    shutil.rmtree(workdir / "checkpoints" / "6")
    changed = _recipe(
        tiny_overrides, "trainer.eval_every=5", "trainer.eval_batches=1", "trainer.num_samples=5",
        "trainer.sample_batch_size=2",
    )  # fmt: skip
    capsys.readouterr()
    trainer = ddiff.runner.Trainer(changed, workdir, show_progress=False)
    state = trainer.run()
    out = capsys.readouterr().out
    assert int(state.step) == 6
    assert "resuming with changed trainer.eval_batches (2 -> 1), trainer.eval_every (0 -> 5)" in out
    assert "steps 4 -> 6 of 6" in out and "eval at step 5: " in out and "eval at step 6: " in out
    summary = out[out.index(f"ddiff: done; run directory {workdir}"):].splitlines()
    assert [line.split()[0] for line in summary[1:]] == ["checkpoints", "metrics", "eval", "samples", "plots"]
    assert "(latest step 6)" in summary[1] and f"ddiff plot {workdir}" in summary[-1]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [
        (2, "train"), (4, "train"), (5, "eval"), (6, "train"), (6, "eval")
    ]
    stats = json.loads((workdir / "samples" / "step_00000006.json").read_text())
    assert (stats["num_samples"], stats["num_batches"]) == (5, 3)
    key = jax.random.fold_in(jax.random.PRNGKey(changed.seed + 1), 6)
    whole = trainer.engine.sample(state.ema, key=key, num_samples=5)
    np.testing.assert_array_equal(np.load(workdir / "samples" / "step_00000006.npy"), np.asarray(whole.tokens))
    # Run once more: nothing to train, and the results of the end are not redone.
    written = {p: p.stat().st_mtime_ns for p in (workdir / "eval.json", workdir / "samples" / "step_00000006.npy")}
    trainer.run()
    assert "steps 6 -> 6 of 6" in capsys.readouterr().out
    assert written == {p: p.stat().st_mtime_ns for p in written}


def test_fresh_moves_the_old_run_aside(tiny_recipe, tmp_path, capsys):
    workdir = tmp_path / "run"
    prepare_workdir(workdir, tiny_recipe).release()
    (workdir / "metrics.jsonl").write_text("{}\n")
    for number in (1, 2):
        prepare_workdir(workdir, tiny_recipe, fresh=True).release()
        assert f"aside to {workdir}.old-{number}" in capsys.readouterr().out
        assert sorted(p.name for p in workdir.iterdir()) == [LOCK_FILE, "checkpoints", "recipe.yaml"]
    assert (tmp_path / "run.old-1" / "metrics.jsonl").read_text() == "{}\n"
    assert sorted(p.name for p in (tmp_path / "run.old-2").iterdir()) == [LOCK_FILE, "checkpoints", "recipe.yaml"]


def test_workdir_that_is_a_file(tiny_overrides, tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("x")
    status = main(["run", QUICKSTART, *tiny_overrides, "--workdir", str(path)])
    _one_line(capsys, status, f"--workdir {path} is a file, not a directory")
    for command in (["eval", str(path)], ["sample", str(path)], ["plot", str(path)]):
        _one_line(capsys, main(command), f"{path} is a file, not a run directory")


# --------------------------------------------------------------------------- results kept


def test_eval_sample_and_diagnose_never_overwrite(full_run, tmp_path, capsys, monkeypatch):
    """On a copy of the tiny run: a second `ddiff eval` and `ddiff sample` get numbered
    names; an explicit name that exists is refused unless --overwrite; diagnose's default
    output is numbered too. `--batch-size 2` draws 5 samples in 3 batches, equal to one
    batch of 5 (sample i is drawn from key i)."""
    source, _ = full_run
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir, ignore=shutil.ignore_patterns("eval_step*", "sample_step*", "diagnose*"))
    for name in ("eval_step00000006.json", "eval_step00000006-2.json"):
        assert main(["eval", str(workdir), "--max-examples", "16"]) == 0
        assert f"wrote {workdir / name}" in capsys.readouterr().err
    first = (workdir / "eval_step00000006.json").read_text()
    _one_line(capsys, main(["eval", str(workdir), "--output", "eval_step00000006.json"]), "exists; choose another")
    assert (workdir / "eval_step00000006.json").read_text() == first

    samples = workdir / "samples"
    assert main(["sample", str(workdir), "--num", "5", "--batch-size", "2"]) == 0
    assert "5 samples in 3 batch(es) of 2" in capsys.readouterr().out
    assert main(["sample", str(workdir), "--num", "5"]) == 0
    assert "5 samples in 1 batch(es) of 5" in capsys.readouterr().out
    batched, whole = (np.load(samples / f"sample_step00000006_seed0{s}.npy") for s in ("", "-2"))
    assert batched.shape == (5, 8)
    np.testing.assert_array_equal(batched, whole)
    assert len((samples / "sample_step00000006_seed0.txt").read_text().splitlines()) == 5
    _one_line(capsys, main(["sample", str(workdir), "--name", "sample_step00000006_seed0"]), "add --overwrite")
    assert main(["sample", str(workdir), "--num", "2", "--name", "sample_step00000006_seed0", "--overwrite"]) == 0
    assert np.load(samples / "sample_step00000006_seed0.npy").shape == (2, 8)

    monkeypatch.chdir(tmp_path)
    for earlier in (workdir / "diagnose.json", tmp_path / "diagnose.json"):
        earlier.write_text("earlier")
    arguments = ["diagnose", str(workdir), "--objective", "md4_elbo", "--batches", "1"]
    assert main(arguments) == 0
    assert f"wrote {workdir / 'diagnose-2.json'}" in capsys.readouterr().out
    _one_line(capsys, main([*arguments, "--output", "diagnose.json"]), "--output diagnose.json exists")
    missing = tmp_path / "missing" / "d.json"
    _one_line(capsys, main([*arguments, "--output", str(missing)]), f"folder {missing.parent} does not exist")
    assert (workdir / "diagnose.json").read_text() == "earlier" == (tmp_path / "diagnose.json").read_text()


def test_write_eval_keeps_the_eval_of_another_step(tiny_recipe, tmp_path):
    from ddiff.runner.trainer.rundir import write_eval

    result = {"bits_per_token": 1.0}
    write_eval(tmp_path, tiny_recipe, result, 6)
    write_eval(tmp_path, tiny_recipe, {"bits_per_token": 0.5}, 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]
    write_eval(tmp_path, tiny_recipe, result, 8)
    assert json.loads((tmp_path / "eval_step00000006.json").read_text())["bits_per_token"] == 0.5
    assert json.loads((tmp_path / "eval.json").read_text())["step"] == 8


# --------------------------------------------------------------------------- the EMA's warm-up


def test_ema_warm_up_values():
    """min(d, (1+k)/(10+k)) at step k: 0.1 at the first step, 0.5 at step 8, d from
    k = (10d - 1)/(1 - d) on (8990 for d = 0.999)."""
    steps = jnp.asarray([0, 8, 80, 890, 8989, 8990, 10**6])
    expected = np.minimum(0.999, (1.0 + np.asarray(steps)) / (10.0 + np.asarray(steps)))
    np.testing.assert_allclose(ema_decay_at(steps, 0.999), expected, rtol=1e-6)
    np.testing.assert_allclose(expected[:4], [0.1, 0.5, 0.9, 0.99], rtol=1e-6)
    assert float(ema_decay_at(jnp.asarray(8990), 0.999)) == pytest.approx(0.999, abs=1e-7)


def test_the_train_step_uses_the_warm_up(tiny_recipe, tiny_overrides, tmp_path, capsys):
    """The tiny recipe warms its learning rate up from 0, so step k = 0 leaves the
    parameters p0 as they are and the EMA e1 = 0.1 p0 + 0.9 p0; step k = 1 (decay 2/11)
    gives e2 = 2/11 e1 + 9/11 p2, computed here in float32 as the step does. A plain
    decay of 0.999 would leave e2 within 0.1% of p0.

    The directory holds a first attempt with another recipe that died before its first
    checkpoint: the run starts afresh, and that attempt's metrics lines are dropped."""
    prepare_workdir(tmp_path, _recipe(tiny_overrides, "network.dim=8")).release()
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "split": "train", "loss": 99.0}\n')
    trainer = ddiff.runner.Trainer(tiny_recipe, tmp_path, show_progress=False)
    initial = trainer.engine.init_state()
    state = trainer.run(stop_at_step=2)
    assert "never reached a checkpoint; starting it afresh with this recipe (it changed network.dim)" in capsys.readouterr().out
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 2 and record["loss"] != 99.0
    arrays = lambda model: jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))  # noqa: E731
    first, second = (jnp.float32(1.0 + k) / jnp.float32(10.0 + k) for k in (0, 1))
    moved = 0.0
    for p0, p2, e2 in zip(arrays(initial.model), arrays(state.model), arrays(state.ema), strict=True):
        e1 = first * p0 + (1.0 - first) * p0
        np.testing.assert_allclose(e2, second * e1 + (1.0 - second) * p2, rtol=1e-6, atol=1e-7)
        moved = max(moved, float(jnp.max(jnp.abs(p2 - p0))))
    assert moved > 1e-4, "the second step must change the parameters for this test to see the EMA"
