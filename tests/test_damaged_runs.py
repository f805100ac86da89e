"""Damaged run directories (issue 32): a metrics.jsonl cut short or edited, an eval record
without its number, a malformed seal, a checkpoint of another network width. Each is one
``ddiff: error:`` line (or, for a last line cut short by a kill, a note), nothing rewritten
that the user must keep."""

import json
import shutil

import pytest

import ddiff.runner
from ddiff.runner.cli import main
from ddiff.runner.plot import plot_run
from ddiff.runner.trainer.writers import truncate_metrics


def _copy(full_run, tmp_path):
    source, _ = full_run
    workdir = tmp_path / "copy"
    shutil.copytree(source, workdir)
    return workdir


def _one_line(capsys, status, *fragments):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ddiff: error: ")]
    assert status == 2 and len(lines) == 1 and err.endswith(lines[0] + "\n"), err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_last_metrics_line_cut_short_by_a_kill_is_dropped_with_a_note(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "split": "train", "loss": 1.0}\n{"step": 4, "spl')
    truncate_metrics(path, 4)
    assert path.read_text() == '{"step": 2, "split": "train", "loss": 1.0}\n'
    assert "cut short" in capsys.readouterr().out


@pytest.mark.parametrize("line", ['{"step": 4, "spl', "[1, 2]", '{"split": "train"}', '{"step": "4"}'])
def test_other_bad_metrics_line_is_refused_with_its_number(tmp_path, line):
    path = tmp_path / "metrics.jsonl"
    text = f'{{"step": 2, "split": "train", "loss": 1.0}}\n{line}\n{{"step": 6}}\n'
    path.write_text(text)
    with pytest.raises(ddiff.runner.RunDirectoryError, match=r"metrics.jsonl, line 2: "):
        truncate_metrics(path, 4)
    assert path.read_text() == text


def test_plot_of_eval_record_without_bits_per_token_is_one_line(full_run, tmp_path):
    workdir = _copy(full_run, tmp_path)
    metrics = workdir / "metrics.jsonl"
    with open(metrics, "a") as handle:
        handle.write(json.dumps({"step": 6, "split": "eval", "num_tokens": 256}) + "\n")
    number = len(metrics.read_text().splitlines())
    with pytest.raises(ddiff.runner.RunDirectoryError, match=f"line {number}: eval record of step 6 has no number bits_per_token"):
        plot_run(workdir)
    assert not (workdir / "curves.png").exists()


@pytest.mark.parametrize("seal", ["[1, 2]", '{"state/x": 3}', '"text"'])
def test_malformed_seal_is_named(full_run, tmp_path, capsys, seal):
    workdir = _copy(full_run, tmp_path)
    for path in (workdir / "checkpoints").glob("*/ddiff_seal.json"):
        path.write_text(seal)
    _one_line(capsys, main(["eval", str(workdir)]), "no checkpoint", "can be restored")
    with pytest.raises(ddiff.runner.RunDirectoryError):
        ddiff.runner.load_run(workdir)


def test_checkpoint_of_another_width_is_one_line_with_no_dump(full_run, tmp_path, capsys):
    workdir = _copy(full_run, tmp_path)
    _one_line(capsys, main(["eval", str(workdir), "network.dim=32"]), "checkpoint 6", "of another network", "[6, 16]", "[6, 32]")


def test_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, tiny_overrides, capsys, monkeypatch):
    """A save whose file write fails with ENOSPC (in orbax's background thread) stops the
    run with one line naming the checkpoint left intact; a rerun resumes from it."""
    import errno

    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    original = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def full_disk(self, item, directory):
        if "6.orbax-checkpoint-tmp" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, item, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full_disk)
    workdir = tmp_path / "run"
    status = main(["run", "recipes/quickstart.yaml", "--workdir", str(workdir), *tiny_overrides])
    _one_line(capsys, status, "cannot save checkpoint 6", "No space left on device", "checkpoint 4 is intact")
    monkeypatch.undo()
    _, state = ddiff.runner.load_run(workdir)
    assert int(state.step) == 4


def test_an_unwritable_plot_or_output_folder_is_one_line_and_leaves_nothing(full_run, tmp_path, capsys, monkeypatch):
    """Simulated (the tests may run as root, whom permissions do not stop): the picture
    cannot be written (Permission denied while saving) -> one line naming it, no temporary
    file left; an --output folder that is not writable is refused before anything runs."""
    import errno
    import os

    import matplotlib.figure

    workdir = _copy(full_run, tmp_path)

    def refuse(self, path, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", refuse)
    assert main(["plot", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddiff: error: ") and err.count("\n") == 1
    assert "Permission denied; check its permissions" in err and ".curves.png.tmp" in err
    assert not [p for p in os.listdir(workdir) if ".tmp" in p]
    monkeypatch.undo()
    folder = tmp_path / "locked"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(folder) else real_access(path, mode))
    assert main(["bench", "tiny", "--samplers", "--output", str(folder / "bench.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not writable" in err
