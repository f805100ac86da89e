"""Readers beside a writer: eval and load_run open checkpoints read-only, output names are
reserved atomically, and a samples/ folder removed mid-run is made again."""

import json
import os
import shutil
import threading
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest
from conftest import TINY_OVERRIDES

import ddiff.runner
from ddiff.runner import RunDirectoryError, checkpoint, main
from ddiff.runner.files import atomic_write_text, reserved_path, unused_path
from ddiff.runner.trainer import loop, sampling


def _arrays(state):
    return [np.asarray(a) for a in jax.tree.leaves(eqx.filter(state, eqx.is_array))]


def _tree(directory: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``directory`` with its size and modification time."""
    return {
        str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(directory.rglob("*"))
    }


def test_readers_remove_create_and_write_nothing_under_checkpoints(full_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(full_run[0], workdir)
    in_flight = workdir / "checkpoints" / "8.orbax-checkpoint-tmp-1234567890"
    in_flight.mkdir()
    (in_flight / "part").write_bytes(b"a save in flight")
    before = _tree(workdir / "checkpoints")
    recipe, state = ddiff.runner.load_run(workdir)
    assert int(state.step) == 6
    assert main(["eval", str(workdir), "--output", "mine.json"]) == 0
    assert _tree(workdir / "checkpoints") == before
    busy = workdir / "samples" / "sample_step00000006_seed0"
    with reserved_path(busy, (".txt", ".npy", ".json")):
        assert main(["sample", str(workdir), "--num", "4"]) == 0
    assert sorted(p.name for p in (workdir / "samples").glob("sample_step*")) == [
        f"sample_step00000006_seed0-2{ext}" for ext in (".json", ".npy", ".txt")
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "recipe.yaml").write_text((workdir / "recipe.yaml").read_text())
    assert main(["eval", str(empty)]) == 2
    assert sorted(p.name for p in empty.iterdir()) == ["recipe.yaml"]


def test_a_checkpoint_dropped_while_read_sends_the_reader_to_the_newest(full_run, tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(full_run[0], workdir)
    shutil.copytree(workdir / "checkpoints" / "6", workdir / "checkpoints" / "7")
    restore = checkpoint._restore_step

    def dropped_by_the_trainer(manager, step, template):
        if step == 7:
            shutil.rmtree(Path(manager.directory) / "7")
        return restore(manager, step, template)

    monkeypatch.setattr(checkpoint, "_restore_step", dropped_by_the_trainer)
    assert int(ddiff.runner.load_run(workdir)[1].step) == 6
    assert "damaged" not in capsys.readouterr().err


def test_concurrent_reservations_get_distinct_names(tmp_path):
    count = 6
    held = threading.Barrier(count)
    names: list[Path] = []

    def command():
        with reserved_path(tmp_path / "eval_step00000006.json") as name:
            held.wait(timeout=30)
            names.append(name)
            atomic_write_text(name, "{}")

    threads = [threading.Thread(target=command) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(names)) == count
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in names)
    with reserved_path(tmp_path / "s", (".txt", ".npy")) as first, reserved_path(tmp_path / "s", (".txt", ".npy")) as second:
        assert first != second and unused_path(tmp_path / "s", (".txt",)) not in (first, second)
    assert not list(tmp_path.glob(".*"))


def test_a_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(RunDirectoryError, match=r"cannot write in .* \(Permission denied\); make it writable"):
        with reserved_path(tmp_path / "eval_step00000006.json"):
            pass


def test_eval_beside_training_then_the_run_is_bitwise_an_uninterrupted_one(full_run, tmp_path, monkeypatch):
    """The tiny run checkpointing every step, with ``ddiff eval`` run on its directory
    while each save is in flight (one of them while another eval holds the default
    name), and its samples/ folder removed while the final samples are written."""
    workdir = tmp_path / "run"
    recipe = ddiff.runner.load_recipe("recipes/quickstart.yaml", (*TINY_OVERRIDES, "trainer.checkpoint_every=1"))
    saved = loop.save_checkpoint
    evals = []

    def save_then_eval(manager, state, iterator_state):
        saved(manager, state, iterator_state)
        step = int(state.step)
        if step in (2, 4):
            # The eval reads checkpoint step - 1 or step (the one in flight, if finished):
            # another eval holds both default names.
            names = [workdir / f"eval_step{read:08d}.json" for read in (step - 1, step)]
            with reserved_path(names[0]) as first, reserved_path(names[1]) as second:
                assert main(["eval", str(workdir), "--max-examples", "16"]) == 0
                assert not first.exists() and not second.exists()
            evals.append(step)

    class RemovedMidway(sampling.SampleWriter):
        def add(self, *args, **kwargs):
            super().add(*args, **kwargs)
            shutil.rmtree(self.directory)

    monkeypatch.setattr(loop, "save_checkpoint", save_then_eval)
    monkeypatch.setattr(loop, "SampleWriter", RemovedMidway)
    state = ddiff.runner.Trainer(recipe, workdir, show_progress=False).run()
    assert evals == [2, 4]
    for a, b in zip(_arrays(state), _arrays(full_run[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    restored = ddiff.runner.load_run(workdir)[1]
    for a, b in zip(_arrays(restored), _arrays(full_run[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    written = sorted(workdir.glob("eval_step*.json"))
    assert len(written) == 2 and all(path.stem.endswith("-2") for path in written)
    for path, step in zip(written, evals, strict=True):
        assert json.loads(path.read_text())["step"] in (step - 1, step)
    assert not list(workdir.glob(".*.reserved"))
    for ext in (".txt", ".npy", ".json"):
        name = f"samples/step_00000006{ext}"
        assert (workdir / name).read_bytes() == (full_run[0] / name).read_bytes()
