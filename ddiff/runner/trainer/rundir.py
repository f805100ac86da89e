"""The run directory: the recipe that made it, evaluation results, the checks that keep a
run from mixing with another, and loading a run's latest checkpoint."""

import dataclasses
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from ddiff._constant import trainable
from ddiff._errors import DdiffError, RunDirectoryError
from ddiff.runner.checkpoint import CHECKPOINT_DIR, checkpoint_reader, restore_latest
from ddiff.runner.files import atomic_write_text, unused_path
from ddiff.runner.mesh import batch_shards
from ddiff.runner.recipe import Recipe, dump_yaml, load_recipe, parse_yaml
from ddiff.runner.trainer.engine import Engine
from ddiff.runner.trainer.state import TrainState

RECIPE_FILE = "recipe.yaml"
EVAL_FILE = "eval.json"
LOCK_FILE = ".ddiff.lock"
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"

RESUMABLE = (
    "trainer.steps",
    "trainer.log_every",
    "trainer.eval_every",
    "trainer.eval_batches",
    "trainer.checkpoint_every",
    "trainer.keep_checkpoints",
    "trainer.sample_every",
    "trainer.num_samples",
    "trainer.sample_batch_size",
    "trainer.final_eval",
    "trainer.on_nonfinite",
    "eval",
    "sampler",
    "logging",
    "mesh",
    "data.root",
    "data.path",
    "data.download",
)
"""Recipe keys (and whole sections) that may change when a run resumes from a
checkpoint: how long to train, the cadences of logs, evaluations, samples and
checkpoints, what to do with a non-finite step, evaluation and sampling settings,
logging, the mesh, and where the data lie (a run may resume on another machine; the
checkpoint is laid out on the new mesh, and no draw depends on the mesh). Nothing here
changes the train state a step computes from its predecessor, up to float round-off
between meshes; ``trainer.steps`` also stretches the learning rate's decay."""


def warn(message: str) -> None:
    """A warning on stderr (a damaged checkpoint passed over, ...)."""
    print(message, file=sys.stderr, flush=True)


def note(message: str) -> None:
    """A note on what happens to the run directory, printed by process 0."""
    if jax.process_index() == 0:
        print(message, flush=True)


def resumable(path: str) -> bool:
    """Whether the dotted recipe key ``path`` may change on resume (:data:`RESUMABLE`)."""
    return any(path == key or path.startswith((f"{key}.", f"{key}[")) for key in RESUMABLE)


class RunLock:
    """An exclusive lock on a run directory, held by one process at a time.

    The lock is ``flock`` on ``DIR/.ddiff.lock``: the operating system releases it when
    the process ends however it ends (exit, crash, SIGKILL), so a crashed run never
    leaves its directory stuck. The file records who holds it, for the message of the
    process that is refused. In a multi-process run only process 0 takes it.
    """

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self._handle: Any = None

    def acquire(self) -> "RunLock":
        """Take the lock, or refuse naming the process that holds it.

        Raises:
            RunDirectoryError: another process holds the lock.
        """
        if jax.process_index() != 0:
            return self
        path = self.workdir / LOCK_FILE
        if path.is_dir():
            raise RunDirectoryError(
                f"{path} is a directory where ddiff keeps its lock file; move it away"
            )
        try:
            handle = open(path, "a+")  # noqa: SIM115 - held open while the lock is held
        except OSError as error:
            raise RunDirectoryError(
                f"cannot write the lock file {path} ({error.strerror}); make {self.workdir} "
                f"writable, or use another --workdir"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise RunDirectoryError(
                f"{self.workdir} is in use by {holder or 'another process'}; wait for it "
                f"to end, or use another --workdir"
            ) from None
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"ddiff process {os.getpid()} on {socket.gethostname()} since {started}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        """Let the lock go (closing the file releases it)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def has_checkpoint(workdir: Path) -> bool:
    """Whether the run directory holds a checkpoint (complete or not)."""
    directory = Path(workdir) / CHECKPOINT_DIR
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _moved_aside(workdir: Path) -> Path:
    """The first ``DIR.old-N`` that does not exist."""
    number = 1
    while (aside := workdir.with_name(f"{workdir.name}.old-{number}")).exists():
        number += 1
    return aside


def prepare_workdir(
    workdir: Path, recipe: Recipe, *, fresh: bool = False, note: Callable[[str], None] = print
) -> RunLock:
    """Lock the run directory (creating it) and check the recipe against the one that
    made it, then write the recipe there (and create ``checkpoints/``, which from then on
    marks the directory as a run's). Returns the held lock.

    - A directory whose run has a checkpoint resumes only with changes at the keys of
      :data:`RESUMABLE` (each is ``note``-d); any other change is refused, naming every
      differing key with its old and new value.
    - A directory whose run never reached a checkpoint starts afresh with the new recipe.
    - A directory with the records of a run but whose checkpoints are gone is refused
      (:func:`check_history`): resuming would restart at step 0 and drop the history.
    - A ``recipe.yaml`` that ddiff did not write (:func:`written_by_ddiff`) is moved
      aside to ``recipe.user.yaml`` (``note``-d), never overwritten.
    - With ``fresh``, an existing run is first moved aside to ``DIR.old-N`` (never deleted).

    Raises:
        RunDirectoryError: DIR is a file, is locked by another process, cannot be
            written, was made by a different recipe, holds checkpoints without a recipe,
            holds a run's records without its checkpoints, or holds a directory or a file
            where ddiff keeps the other.
    """
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise RunDirectoryError(f"--workdir {workdir} is a file, not a directory; choose another path")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunDirectoryError(f"cannot create the run directory {workdir}: {error.strerror}") from None
    lock = RunLock(workdir).acquire()
    if fresh and jax.process_index() != 0:
        return lock  # process 0 moves the old run aside; the trainer waits for it
    try:
        if fresh and any(p.name != LOCK_FILE for p in workdir.iterdir()):
            aside = _moved_aside(_movable(workdir))
            os.replace(workdir, aside)
            note(f"ddiff: moved the earlier run in {workdir} aside to {aside}")
            workdir.mkdir(exist_ok=True)
            lock.release()
            lock = RunLock(workdir).acquire()
        check_layout(workdir)
        _check_recipe(workdir, recipe, note)
        if jax.process_index() == 0:
            _write_recipe(workdir, recipe, note)
    except BaseException:
        lock.release()
        raise
    return lock


def _movable(workdir: Path) -> Path:
    """``workdir`` as an absolute path that may be renamed: not the current directory
    nor one that holds it (the process would go on working in the moved directory)."""
    absolute = workdir.absolute()
    here = Path.cwd()
    if here == absolute or absolute in here.parents:
        raise RunDirectoryError(
            f"--fresh cannot move {workdir} aside while ddiff runs inside it; run from its "
            f"parent directory with --workdir {absolute.name or absolute}"
        )
    return absolute


def check_layout(workdir: Path) -> None:
    """Refuse a directory where ddiff keeps a file (``recipe.yaml``), a file where it
    keeps a directory (``checkpoints``, ``samples``), or a ``checkpoints`` link to
    nothing (a volume not mounted, a target removed)."""
    workdir = Path(workdir)
    recipe_path = workdir / RECIPE_FILE
    if recipe_path.is_dir():
        raise RunDirectoryError(
            f"{recipe_path} is a directory where ddiff keeps the run's recipe; move it away"
        )
    for name in (CHECKPOINT_DIR, SAMPLES_DIR):
        path = workdir / name
        if path.is_symlink() and not path.exists():
            raise RunDirectoryError(
                f"{path} links to {os.readlink(path)}, which does not exist (a volume not "
                f"mounted?); restore it, or remove the link"
            )
        if path.exists() and not path.is_dir():
            raise RunDirectoryError(
                f"{path} is a file where ddiff keeps the run's {name}; move it away"
            )


def written_by_ddiff(text: str) -> bool:
    """Whether ``text`` is a resolved recipe as ddiff writes it: YAML of a mapping with
    a ``trainer`` and a ``data`` section that is exactly ddiff's dump of itself (a
    recipe of one's own, with comments, another order or flow style, differs)."""
    try:
        mapping = parse_yaml(text, RECIPE_FILE)
    except DdiffError:
        return False
    return (
        isinstance(mapping, dict)
        and isinstance(mapping.get("trainer"), dict)
        and isinstance(mapping.get("data"), dict)
        and dump_yaml(mapping) == text
    )


def _read_text(path: Path) -> str | None:
    """The text of ``path``, or None when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def _write_recipe(workdir: Path, recipe: Recipe, note: Callable[[str], None]) -> None:
    """Create ``checkpoints/`` and write the resolved recipe (a user's own
    ``recipe.yaml`` moved aside first); in that order, so that another process of the
    run never sees the recipe without the directory (:func:`check_history`)."""
    path = workdir / RECIPE_FILE
    text = recipe.to_yaml()
    try:
        if path.exists():
            old = _read_text(path)
            if old != text and (old is None or not written_by_ddiff(old)):
                aside = unused_path(path.with_name("recipe.user.yaml"))
                os.replace(path, aside)
                note(
                    f"ddiff: {path} is not a recipe ddiff wrote; moved it to {aside} "
                    f"({RECIPE_FILE} is the run's resolved recipe)"
                )
        (workdir / CHECKPOINT_DIR).mkdir(exist_ok=True)  # first: a recipe always has it
        atomic_write_text(path, text)
    except OSError as error:
        raise RunDirectoryError(
            f"cannot write in the run directory {workdir} ({error.strerror}); make it "
            f"writable, or use another --workdir"
        ) from None


def _last_step(path: Path) -> int | None:
    """The largest step recorded in a metrics.jsonl (lines that are not records are
    passed over), or None when it records none."""
    steps = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            steps.append(record["step"])
    return max(steps, default=None)


def check_history(workdir: Path, saved: Any) -> None:
    """Refuse a directory without a checkpoint that holds a run's records: training it
    would restart at step 0 and drop them. A run has its past when its ``checkpoints/``
    is missing (ddiff creates it with the recipe) beside a recipe ddiff wrote,
    metrics, evaluations or samples; or when ``checkpoints/`` is empty beside an
    ``eval.json`` (written after the final checkpoint) or metrics past twice
    ``trainer.checkpoint_every`` of ``saved`` (a save waits for the previous one, so
    the first checkpoint was complete). ``saved`` is the parsed recipe.yaml, if any."""
    workdir = Path(workdir)
    step = _last_step(workdir / METRICS_FILE)
    evaluated = sorted(p.name for p in workdir.glob("eval*.json"))
    sampled = (workdir / SAMPLES_DIR).is_dir() and any((workdir / SAMPLES_DIR).iterdir())
    recipe_path = workdir / RECIPE_FILE
    recorded = recipe_path.is_file() and written_by_ddiff(_read_text(recipe_path) or "")
    found = [
        *([f"{METRICS_FILE} (to step {step})"] if step is not None else []),
        *evaluated,
        *([f"{SAMPLES_DIR}/"] if sampled else []),
        *([RECIPE_FILE] if recorded else []),
    ]
    if (workdir / CHECKPOINT_DIR).is_dir():
        trainer = saved.get("trainer") if isinstance(saved, dict) else None
        every = trainer.get("checkpoint_every") if isinstance(trainer, dict) else None
        past = isinstance(every, int) and step is not None and step > 2 * every
        if not (EVAL_FILE in evaluated or past):
            return
    elif not found:
        return
    raise RunDirectoryError(
        f"{workdir} holds {', '.join(found)} but no checkpoint in {workdir / CHECKPOINT_DIR} "
        f"(removed, or on a volume not mounted?); training would restart at step 0 and "
        f"drop that history. Restore the checkpoints to resume, or add --fresh to move the "
        f"old files aside to {workdir.name}.old-N and start over"
    )


def _check_recipe(workdir: Path, recipe: Recipe, note: Callable[[str], None]) -> None:
    recipe_path = workdir / RECIPE_FILE
    checkpointed = has_checkpoint(workdir)
    if not recipe_path.exists():
        if checkpointed:
            raise RunDirectoryError(
                f"{workdir} has checkpoints but no {RECIPE_FILE}; use another --workdir"
            )
        check_history(workdir, None)
        return
    text = _read_text(recipe_path)
    saved = None
    if text is not None:
        try:
            saved = parse_yaml(text, str(recipe_path)) or {}
        except DdiffError:
            saved = None
    if not checkpointed:
        check_history(workdir, saved)
    if not isinstance(saved, dict):
        if checkpointed:
            raise RunDirectoryError(f"{recipe_path} is damaged; use another --workdir")
        return
    if not checkpointed and not written_by_ddiff(text):
        return  # a recipe of the user's own, moved aside before the run's is written
    changes = recipe_changes(saved, recipe.resolved)
    if not changes:
        step = None if checkpointed else _last_step(workdir / METRICS_FILE)
        if step is not None:
            note(
                f"ddiff: {workdir} never reached a checkpoint; starting it afresh (the "
                f"attempt's {METRICS_FILE} lines to step {step} are dropped)"
            )
        return
    if not checkpointed:
        note(
            f"ddiff: {workdir} never reached a checkpoint; starting it afresh with this recipe "
            f"(it changed {', '.join(change.path for change in changes)})"
        )
        return
    refused = [change for change in changes if not resumable(change.path)]
    if refused:
        raise RunDirectoryError(
            f"{workdir} was trained with another recipe; on resume only steps, cadences, "
            f"eval, sampler, logging and mesh settings and the data's location may change, but "
            f"this recipe changes {'; '.join(map(str, refused))}. Use another --workdir, "
            f"add --fresh to move the old run aside, or use the recipe in {recipe_path}"
        )
    note(f"ddiff: resuming with changed {', '.join(map(str, changes))}")


@dataclasses.dataclass(frozen=True)
class Change:
    """One key at which two resolved recipes differ."""

    path: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.path} ({_shown(self.old)} -> {_shown(self.new)})"


def _shown(value: Any) -> str:
    if value is _ABSENT:
        return "absent"
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


_ABSENT = object()


def recipe_changes(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[Change]:
    """Every key at which two resolved recipes differ, in key order, with both values
    (a key one of them lacks is ``absent`` there)."""
    changes = []
    for key in sorted(set(saved) | set(current), key=str):
        path = f"{prefix}{key}"
        a, b = saved.get(key, _ABSENT), current.get(key, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += recipe_changes(a, b, f"{path}.")
        elif a != b:
            changes.append(Change(path, a, b))
    return changes


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys at which two resolved recipes differ and which may not change on
    resume (:func:`resumable`)."""
    return [change.path for change in recipe_changes(saved, current) if not resumable(change.path)]


def check_same_shape(trained: Recipe, asked: Recipe) -> None:
    """Refuse a recipe whose data has another vocabulary size or length than the data a
    run was trained on (its network could not read them)."""
    shape = trained.data.vocab_size, trained.data.seq_len
    if shape != (asked.data.vocab_size, asked.data.seq_len):
        raise RunDirectoryError(
            f"the run was trained on data with V={shape[0]}, D={shape[1]}; the data asked "
            f"for has V={asked.data.vocab_size}, D={asked.data.seq_len}"
        )


def write_eval(
    workdir: Path, recipe: Recipe, result: dict[str, Any], step: int, *, name: str | Path | None = None
) -> Path:
    """Write an evaluation result, with the step and the data's reference numbers, as
    ``workdir/name`` (default ``eval.json``); returns its path. An ``eval.json`` of
    another step (a run extended beyond its first end) is kept as ``eval_step<k>.json``,
    never overwritten."""
    payload = {"step": step, **result, **recipe.data.reference_stats()}
    path = Path(workdir) / (name or EVAL_FILE)
    if jax.process_index() == 0:
        if name is None and path.exists():
            try:
                previous = json.loads(path.read_text()).get("step")
            except (OSError, ValueError, AttributeError):
                previous = None
            if previous != step:
                stem = f"eval_step{previous:08d}" if isinstance(previous, int) else "eval_previous"
                os.replace(path, unused_path(path.with_name(f"{stem}.json")))
        atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return path


def print_header(recipe: Recipe, state: TrainState, mesh: Mesh, start: int, end: int) -> None:
    """Two lines on what is trained, on which mesh, from which step to which."""
    if jax.process_index() != 0:
        return
    params = trainable(state.model)
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    names = recipe.names
    batch = recipe.trainer.batch_size
    shape = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
    print(
        f"ddiff: {names['objective']} with {names['process']} process, "
        f"{names['parameterization']} parameterization, {names['network']} network "
        f"({count:,} parameters); data {names['data']} (V={recipe.data.vocab_size}, "
        f"D={recipe.data.seq_len})\n"
        f"ddiff: mesh {shape} over {mesh.size} devices in {jax.process_count()} processes; "
        f"global batch {batch}, {batch // batch_shards(mesh)} per device; "
        f"steps {start} -> {end} of {recipe.trainer.steps}",
        flush=True,
    )


def load_run(workdir: str | Path, overrides: tuple[str, ...] = ()) -> tuple[Recipe, TrainState]:
    """The recipe of a run directory (with ``overrides``, which may not change the data's
    vocabulary or length) and its latest intact checkpointed state."""
    workdir = Path(workdir)
    recipe_path = workdir / RECIPE_FILE
    check_layout(workdir)
    if not recipe_path.exists():
        raise RunDirectoryError(
            f"{workdir} is not a ddiff run directory (no {RECIPE_FILE}); "
            f"train into it first with: ddiff run RECIPE --workdir {workdir}"
        )
    recipe = load_recipe(recipe_path, overrides)
    if overrides:
        check_same_shape(load_recipe(recipe_path), recipe)
    engine = Engine(recipe)
    manager = checkpoint_reader(workdir)
    try:
        restored = restore_latest(manager, engine.init_state(), warn=warn)
    finally:
        manager.close()
    if restored is None:
        raise RunDirectoryError(f"{workdir} has no checkpoint yet; train first with ddiff run")
    return recipe, restored[0]
