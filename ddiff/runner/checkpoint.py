"""Checkpoints: orbax saves of the train state's arrays and the data iterator's position,
sealed with a manifest of file sizes and SHA-256 digests once complete, restored newest
first with a fall-back past damaged ones.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so
a run killed mid-save leaves only a temporary directory, which is removed at the next
start (by the training run, which holds the run's lock) and never loaded. The seal
additionally catches later damage (a truncated or altered file), which is named when the
checkpoint is refused.

Readers (eval, sample, quality, diagnose: :func:`checkpoint_reader`) open the directory
read-only: they remove, create and write nothing under it, so they may run beside the
training run that writes it.
"""

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from ddiff._constant import is_constant, is_saved
from ddiff._errors import RunDirectoryError

CHECKPOINT_DIR = "checkpoints"
SEAL_FILE = "ddiff_seal.json"


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError (a full disk, a lost volume) behind ``error``, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class _FailedSaveFilter(logging.Filter):
    """Drops orbax's error logs of a save that failed on the file system (and those of its
    background threads that follow): ddiff reports that save in one line."""

    failed = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.exc_info and _os_error(record.exc_info[1]) is not None:
            type(self).failed = True
        return not type(self).failed


_FAILED_SAVES = _FailedSaveFilter()
logging.getLogger("absl").addFilter(_FAILED_SAVES)


def _saving(manager: ocp.CheckpointManager, step: int, action: Callable[[], None]) -> None:
    """Run a save ``action``; an OSError behind its failure becomes one line."""
    try:
        action()
    except Exception as error:
        cause = _os_error(error)
        if cause is None:
            raise
        _FailedSaveFilter.failed = True
        kept = [s for s in manager.all_steps() if s != step and _step_dir(manager, s).is_dir()]
        previous = f"checkpoint {max(kept)} is intact" if kept else "no earlier checkpoint was saved"
        raise RunDirectoryError(
            f"cannot save checkpoint {step} in {manager.directory} ({cause.strerror or cause}); "
            f"{previous}: free space (or fix the volume) and rerun to resume"
        ) from None


def checkpoint_manager(workdir: Path, keep: int) -> ocp.CheckpointManager:
    """The training run's orbax manager for ``workdir/checkpoints``: keeps ``keep``
    checkpoints and removes temporary directories left by an interrupted save (only the
    run holding the run's lock may open it)."""
    _FailedSaveFilter.failed = False
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(
        (Path(workdir) / CHECKPOINT_DIR).absolute(), options=options, item_names=("state", "data")
    )


def checkpoint_reader(workdir: Path) -> ocp.CheckpointManager:
    """A read-only orbax manager for ``workdir/checkpoints``: it restores, and removes,
    creates or writes nothing (a save in flight beside it, its temporary directory
    included, is left alone). Orbax's warnings that the directory is read-only, which is
    what is asked, are not shown."""
    options = ocp.CheckpointManagerOptions(
        read_only=True, create=False, max_to_keep=None, save_interval_steps=0
    )
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        return ocp.CheckpointManager(
            (Path(workdir) / CHECKPOINT_DIR).absolute(), options=options, item_names=("state", "data")
        )
    finally:
        absl.setLevel(level)


def _leaves(state: Any) -> dict[str, jax.Array]:
    """The state's arrays, copied on device so that the next step may donate the originals
    while the (possibly multi-process, sharded) save completes."""
    arrays = jax.tree.leaves(eqx.filter(state, is_saved, is_leaf=is_constant))
    return {f"leaf_{i:05d}": jnp.copy(a) for i, a in enumerate(arrays)}


def save_checkpoint(manager: ocp.CheckpointManager, state: Any, iterator_state: dict) -> None:
    """Start saving ``state`` and seal every earlier checkpoint that has finished."""
    pending = manager.latest_step()
    _saving(manager, pending, manager.check_for_errors)
    seal_finished(manager)
    arguments = ocp.args.Composite(
        state=ocp.args.StandardSave(_leaves(state)), data=ocp.args.JsonSave(iterator_state)
    )
    _saving(manager, int(state.step), lambda: manager.save(int(state.step), args=arguments))


def finish_saving(manager: ocp.CheckpointManager) -> None:
    """Wait for pending saves, raise their errors, and seal them."""
    pending = manager.latest_step()
    _saving(manager, pending, manager.wait_until_finished)
    _saving(manager, pending, manager.check_for_errors)
    seal_finished(manager)


def _step_dir(manager: ocp.CheckpointManager, step: int) -> Path:
    return Path(manager.directory) / str(step)


def _digests(directory: Path) -> dict[str, list]:
    result = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != SEAL_FILE):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        result[str(path.relative_to(directory))] = [path.stat().st_size, digest.hexdigest()]
    return result


def seal_finished(manager: ocp.CheckpointManager) -> None:
    """Write the seal of every complete checkpoint that has none (atomically; by the
    first process only)."""
    if jax.process_index() != 0:
        return
    if manager.is_saving_in_progress():
        in_progress = manager.latest_step()
    else:
        in_progress = None
    for step in manager.all_steps():
        directory = _step_dir(manager, step)
        if step == in_progress or (directory / SEAL_FILE).exists() or not directory.exists():
            continue
        seal = directory / SEAL_FILE
        temporary = directory / f".{SEAL_FILE}.tmp"
        temporary.write_text(json.dumps(_digests(directory)))
        os.replace(temporary, seal)


def _is_seal(value: Any) -> bool:
    """Whether ``value`` has the seal's form: {relative path: [size in bytes, SHA-256 hex]}."""
    return isinstance(value, dict) and all(
        isinstance(entry, list)
        and len(entry) == 2
        and isinstance(entry[0], int)
        and not isinstance(entry[0], bool)
        and isinstance(entry[1], str)
        for entry in value.values()
    )


def verify_seal(directory: Path) -> str | None:
    """None if the checkpoint matches its seal (or has none yet); else what is wrong."""
    seal = directory / SEAL_FILE
    if not seal.exists():
        return None
    try:
        expected = json.loads(seal.read_text())
    except (OSError, ValueError):
        return f"its seal {seal} is unreadable"
    if not _is_seal(expected):
        return f"its seal {seal} is not an object of [size, sha256] per file"
    actual = _digests(directory)
    for name, (size, digest) in expected.items():
        if name not in actual:
            return f"file {directory / name} is missing"
        if actual[name][0] != size:
            return f"file {directory / name} has {actual[name][0]} bytes, {size} were written"
        if actual[name][1] != digest:
            return f"file {directory / name} was altered since it was written"
    return None


class CheckpointShapeError(RunDirectoryError):
    """A checkpoint of another network (width, depth, vocabulary or dtype) than the recipe's."""


def _check_shapes(manager: ocp.CheckpointManager, step: int, leaves: list[jax.Array]) -> None:
    """Refuse checkpoint ``step`` when its saved arrays (read from their metadata, before
    any array is read) differ in number, shape or dtype from ``leaves``."""
    saved = ocp.StandardCheckpointHandler().metadata(_step_dir(manager, step) / "state")
    found = {name: (tuple(entry.shape), str(entry.dtype)) for name, entry in saved.items()}
    expected = {f"leaf_{i:05d}": (tuple(a.shape), str(a.dtype)) for i, a in enumerate(leaves)}
    if found == expected:
        return
    if len(found) != len(expected):
        difference = f"it holds {len(found)} arrays, this recipe's state has {len(expected)}"
    else:
        name = next(name for name in expected if found.get(name) != expected[name])
        (have, have_dtype), (want, want_dtype) = found.get(name, ((), "none")), expected[name]
        difference = (
            f"array {int(name.split('_')[1])} is {have_dtype}{list(have)} there, "
            f"this recipe's is {want_dtype}{list(want)}"
        )
    raise CheckpointShapeError(
        f"checkpoint {step} in {manager.directory} is of another network ({difference}); "
        f"use the recipe it was trained with (its recipe.yaml), or another --workdir"
    )


def _restore_step(
    manager: ocp.CheckpointManager, step: int, template: Any
) -> tuple[Any, dict]:
    dynamic, static = eqx.partition(template, is_saved, is_leaf=is_constant)
    leaves, treedef = jax.tree.flatten(dynamic)
    target = {
        f"leaf_{i:05d}": jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
        for i, a in enumerate(leaves)
    }
    _check_shapes(manager, step, leaves)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()),
    )
    arrays = []
    for i, leaf in enumerate(leaves):
        value = restored.state[f"leaf_{i:05d}"]
        if value.shape != leaf.shape or value.dtype != leaf.dtype:
            raise ValueError(f"leaf {i} has shape {value.shape} {value.dtype}, expected {leaf.shape} {leaf.dtype}")
        arrays.append(value)
    return eqx.combine(jax.tree.unflatten(treedef, arrays), static), restored.data


def _try_restore(
    manager: ocp.CheckpointManager, step: int, template: Any
) -> tuple[tuple[Any, dict] | None, str | None]:
    """(state, iterator state) of checkpoint ``step``, or None with what is wrong with it
    (None as well when the checkpoint was removed meanwhile: the training run beside
    dropped its oldest)."""
    directory = _step_dir(manager, step)
    try:
        problem = verify_seal(directory)
        if problem is None:
            return _restore_step(manager, step, template), None
    except CheckpointShapeError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure means unusable
        problem = f"it cannot be read ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    return None, None if not directory.exists() else problem


def restore_latest(
    manager: ocp.CheckpointManager, template: Any, *, warn: Callable[[str], None] = print
) -> tuple[Any, dict, int] | None:
    """Restore the newest checkpoint that is intact, warning about each damaged one. A
    checkpoint removed while it was read (by the training run beside a reader, keeping
    its newest) sends the search back to the newest checkpoint then present.

    Returns:
        (state, iterator state, step), or None when there is no checkpoint.

    Raises:
        RunDirectoryError: checkpoints exist but none can be restored.
    """
    tried: set[int] = set()
    problems = []
    while True:
        steps = [step for step in sorted(manager.all_steps(), reverse=True) if step not in tried]
        removed = False
        for step in steps:
            tried.add(step)
            restored, problem = _try_restore(manager, step, template)
            if restored is not None:
                return *restored, step
            if problem is None:
                removed = True
                break
            problems.append(step)
            warn(f"ddiff: warning: checkpoint {step} in {manager.directory} is damaged: {problem}")
        if not removed:
            break
        manager.reload()
    if problems:
        raise RunDirectoryError(
            f"no checkpoint in {manager.directory} can be restored (tried {', '.join(map(str, problems))}); "
            f"move that directory aside to train from scratch"
        )
    return None
