"""A run never forgets its past silently: a run directory whose checkpoints are gone is
refused (``--fresh`` moves it aside), a recipe.yaml of the user's own is moved aside,
``ddiff plot`` and ``ddiff bench`` never write over a file without ``--overwrite`` (plot
never over a data file), and the directory's odd shapes (a file where ddiff keeps a
directory, a link to nothing, a lock that cannot be written) end in one line."""

import errno
import os
import shutil
from pathlib import Path

import pytest

from ddiff.runner import main
from ddiff.runner.trainer import rundir
from ddiff.runner.trainer.rundir import LOCK_FILE, prepare_workdir, written_by_ddiff

QUICKSTART = str(Path("recipes/quickstart.yaml").absolute())


def _one_line(capsys, status, expected):
    captured = capsys.readouterr()
    assert status == 2, captured
    assert captured.err.startswith("ddiff: error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err and expected in captured.err, captured.err
    return captured.err


@pytest.fixture
def run_copy(full_run, tmp_path):
    """A copy of the finished tiny run (6 steps, checkpoints, metrics, eval.json, samples)."""
    workdir = tmp_path / "run"
    shutil.copytree(full_run[0], workdir)
    return workdir


def test_a_run_whose_checkpoints_are_gone_is_refused_and_fresh_moves_it_aside(run_copy, tiny_recipe, tiny_overrides, capsys):
    metrics = (run_copy / "metrics.jsonl").read_text()
    shutil.rmtree(run_copy / "checkpoints")
    status = main(["run", QUICKSTART, *tiny_overrides, "--workdir", str(run_copy)])
    _one_line(capsys, status, f"{run_copy} holds metrics.jsonl (to step 6), eval.json, samples/, recipe.yaml but no checkpoint")
    assert (run_copy / "metrics.jsonl").read_text() == metrics
    # An emptied checkpoints/ (a volume not mounted) beside eval.json is refused too.
    (run_copy / "checkpoints").mkdir()
    with pytest.raises(rundir.RunDirectoryError, match="--fresh to move the old files aside"):
        prepare_workdir(run_copy, tiny_recipe)
    prepare_workdir(run_copy, tiny_recipe, fresh=True).release()
    assert (run_copy.with_name("run.old-1") / "metrics.jsonl").read_text() == metrics
    assert sorted(p.name for p in run_copy.iterdir()) == [LOCK_FILE, "checkpoints", "recipe.yaml"]


def test_a_users_recipe_in_the_run_directory_is_moved_aside(tiny_recipe, tmp_path, capsys):
    assert written_by_ddiff(tiny_recipe.to_yaml())
    workdir = tmp_path / "run"
    workdir.mkdir()
    mine = "# my notes\n" + Path(QUICKSTART).read_text()
    (workdir / "recipe.yaml").write_text(mine)
    prepare_workdir(workdir, tiny_recipe).release()
    assert f"{workdir / 'recipe.yaml'} is not a recipe ddiff wrote; moved it to {workdir / 'recipe.user.yaml'}" in capsys.readouterr().out
    assert (workdir / "recipe.user.yaml").read_text() == mine
    assert (workdir / "recipe.yaml").read_text() == tiny_recipe.to_yaml()
    prepare_workdir(workdir, tiny_recipe).release()  # its own recipe now: nothing moved
    assert "moved" not in capsys.readouterr().out and not (workdir / "recipe.user-2.yaml").exists()
    (workdir / "metrics.jsonl").write_text('{"step": 2, "split": "train", "loss": 1.0}\n')
    prepare_workdir(workdir, tiny_recipe).release()  # died before its first checkpoint: said
    assert "never reached a checkpoint; starting it afresh (the attempt's metrics.jsonl lines to step 2 are dropped)" in capsys.readouterr().out


def test_plot_never_writes_over_a_file_without_overwrite_nor_over_data(run_copy, capsys):
    evaluation = run_copy / "eval.json"
    kept = evaluation.read_text()
    _one_line(capsys, main(["plot", str(run_copy), "--output", str(evaluation)]), "exists; choose another name or add --overwrite")
    _one_line(capsys, main(["plot", str(run_copy), "--output", str(evaluation), "--overwrite"]), "is not a PNG image")
    assert evaluation.read_text() == kept
    inside = run_copy / "checkpoints" / "6" / "curves.png"
    _one_line(capsys, main(["plot", str(run_copy), "--output", str(inside)]), "inside the run's checkpoints")
    picture = run_copy / "mine.png"
    assert main(["plot", str(run_copy), "--output", str(picture)]) == 0
    _one_line(capsys, main(["plot", str(run_copy), "--output", str(picture)]), "add --overwrite")
    assert main(["plot", str(run_copy), "--output", str(picture), "--overwrite"]) == 0


def test_bench_checks_its_output_before_measuring(tmp_path, capsys):
    existing = tmp_path / "bench.json"
    existing.write_text("{}\n")
    _one_line(capsys, main(["bench", "tiny", "--output", str(existing)]), f"--output {existing} exists")
    assert existing.read_text() == "{}\n"
    missing = tmp_path / "missing" / "bench.json"
    _one_line(capsys, main(["bench", "tiny", "--output", str(missing)]), f"folder {missing.parent} does not exist")


def _file_for_checkpoints(workdir):
    (workdir / "checkpoints").write_text("x")
    return "is a file where ddiff keeps the run's checkpoints; move it away"


def _dangling_checkpoints(workdir):
    (workdir / "checkpoints").symlink_to(workdir / "unmounted")
    return "which does not exist (a volume not mounted?)"


def _directory_for_the_lock(workdir):
    (workdir / LOCK_FILE).mkdir()
    return "is a directory where ddiff keeps its lock file"


def _directory_for_the_recipe(workdir):
    (workdir / "recipe.yaml").mkdir()
    return "is a directory where ddiff keeps the run's recipe"


@pytest.mark.parametrize(
    "shape", [_file_for_checkpoints, _dangling_checkpoints, _directory_for_the_lock, _directory_for_the_recipe]
)
def test_odd_run_directories_are_one_line_before_training(shape, tiny_overrides, tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    expected = shape(workdir)
    _one_line(capsys, main(["run", QUICKSTART, *tiny_overrides, "--workdir", str(workdir)]), expected)
    assert not (workdir / "metrics.jsonl").exists()


def test_a_lock_that_cannot_be_written_and_fresh_in_the_current_directory(tiny_overrides, tmp_path, capsys, monkeypatch):
    """The lock's PermissionError is simulated (the suite may run as root, whom a
    read-only directory does not stop)."""
    workdir = tmp_path / "run"
    workdir.mkdir()

    def refused(path, mode="r", *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    with monkeypatch.context() as patch:
        patch.setattr(rundir, "open", refused, raising=False)
        status = main(["run", QUICKSTART, *tiny_overrides, "--workdir", str(workdir)])
    _one_line(capsys, status, f"cannot write the lock file {workdir / LOCK_FILE} (Permission denied)")
    (workdir / "metrics.jsonl").write_text("{}\n")
    monkeypatch.chdir(workdir)
    status = main(["run", QUICKSTART, *tiny_overrides, "--workdir", ".", "--fresh"])
    _one_line(capsys, status, "--fresh cannot move . aside while ddiff runs inside it")
    assert (workdir / "metrics.jsonl").read_text() == "{}\n"
