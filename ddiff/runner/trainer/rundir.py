"""The run directory: the recipe that made it, metrics, evaluation results, and the
checks that keep a run from mixing with another."""

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from ddiff._constant import trainable
from ddiff._errors import RunDirectoryError
from ddiff.runner.checkpoint import CHECKPOINT_DIR
from ddiff.runner.files import atomic_write_text
from ddiff.runner.recipe import Recipe, parse_yaml
from ddiff.runner.trainer.state import TrainState

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"

RESUME_MAY_DIFFER = frozenset({"trainer.log_every", "data.root", "data.path", "data.download"})
"""Resolved-recipe keys that may change between a run and its resumption (logging, and
where the data lie: a run may resume on another machine)."""


def prepare_workdir(workdir: Path, recipe: Recipe) -> None:
    """Create the work directory with the resolved recipe, or check that it was made by
    the same recipe."""
    recipe_path = workdir / RECIPE_FILE
    if recipe_path.exists():
        saved = parse_yaml(recipe_path.read_text(), str(recipe_path)) or {}
        differences = recipe_differences(saved, recipe.resolved)
        if differences:
            shown = ", ".join(differences[:5])
            raise RunDirectoryError(
                f"{workdir} was made by a different recipe (differs at: {shown}); "
                f"use another --workdir, or the recipe in {recipe_path}"
            )
        return
    if workdir.exists() and (workdir / CHECKPOINT_DIR).exists():
        raise RunDirectoryError(
            f"{workdir} has checkpoints but no {RECIPE_FILE}; use another --workdir"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        atomic_write_text(recipe_path, recipe.to_yaml())


def recipe_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys at which two resolved recipes differ (ignoring RESUME_MAY_DIFFER)."""
    differences = []
    for key in sorted(set(saved) | set(current), key=str):
        path = f"{prefix}{key}"
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            differences += recipe_differences(a, b, f"{path}.")
        elif a != b and path not in RESUME_MAY_DIFFER:
            differences.append(path)
    return differences


def check_same_shape(trained: Recipe, asked: Recipe) -> None:
    """Refuse a recipe whose data has another vocabulary size or length than the data a
    run was trained on (its network could not read them)."""
    shape = trained.data.vocab_size, trained.data.seq_len
    if shape != (asked.data.vocab_size, asked.data.seq_len):
        raise RunDirectoryError(
            f"the run was trained on data with V={shape[0]}, D={shape[1]}; the data asked "
            f"for has V={asked.data.vocab_size}, D={asked.data.seq_len}"
        )


def append_metrics(workdir: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to the run's metrics (process 0 only)."""
    if jax.process_index() != 0:
        return
    with open(workdir / METRICS_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines written after ``step`` (by a run that died before checkpointing)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def write_eval(
    workdir: Path, recipe: Recipe, result: dict[str, Any], step: int, *, name: str | None = None
) -> Path:
    """Write an evaluation result, with the step and the data's reference numbers, as
    ``workdir/eval.json`` (or ``name``); returns its path."""
    payload = {"step": step, **result, **recipe.data.reference_stats()}
    path = Path(workdir) / (name or EVAL_FILE)
    if jax.process_index() == 0:
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
        f"global batch {batch}, {batch // mesh.size} per device; "
        f"steps {start} -> {end} of {recipe.trainer.steps}",
        flush=True,
    )
