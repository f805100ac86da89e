"""Where the trainer's records go: ``metrics.jsonl`` always, TensorBoard event files and
Weights & Biases as the recipe's ``logging`` section asks (process 0 only). Nothing else
writes a run's metrics."""

import importlib
import json
import secrets
from pathlib import Path
from typing import Any

import jax

from ddiff._errors import DdiffError
from ddiff.runner.files import atomic_write_text
from ddiff.runner.plot import metric_lines
from ddiff.runner.recipe import Recipe

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id"


class LoggingError(DdiffError):
    """A logging package that is installed but cannot be used."""


def _import(module: str, key: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - any failure to import is the same refusal
        raise LoggingError(
            f"logging.{key}: cannot import {module} ({type(error).__name__}: {error}); "
            f"reinstall it, or set logging.{key}=false"
        ) from None


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a record under ``split/name`` (``train/loss``, ``eval/bits_per_token``)."""
    split = record.get("split", "train")
    return {
        f"{split}/{key}": float(value)
        for key, value in record.items()
        if key not in ("step", "split") and isinstance(value, int | float) and not isinstance(value, bool)
    }


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines written after ``step`` (by a run that died before checkpointing)
    and a last line cut short by a kill (with a note).

    Raises:
        RunDirectoryError: another line is not a metrics record (named by its number).
    """
    if not path.exists():
        return
    records, cut_short = metric_lines(path)
    kept = [line for _, line, record in records if record["step"] <= step]
    if cut_short:
        print(f"ddiff: dropped the last line of {path}: cut short by a run killed while writing it", flush=True)
    if cut_short or len(kept) != len(records) or not path.read_bytes().endswith(b"\n"):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


class MetricWriters:
    """The run's metric writers, opened for a run that starts (or resumes) at step
    ``start``: the lines of metrics.jsonl after ``start`` (written by a run that died
    before its next checkpoint) are dropped, as TensorBoard purges its later events. A
    record is a mapping with ``step``, ``split`` (``train`` or ``eval``) and numbers."""

    def __init__(self, workdir: Path, recipe: Recipe, start: int):
        self.workdir = Path(workdir)
        self.tensorboard: Any = None
        self.wandb_run: Any = None
        if jax.process_index() != 0:
            return
        truncate_metrics(self.workdir / METRICS_FILE, start)
        config = recipe.logging
        if config.tensorboard:
            tensorboardx = _import("tensorboardX", "tensorboard")
            self.tensorboard = tensorboardx.SummaryWriter(
                logdir=str(self.workdir / TENSORBOARD_DIR), purge_step=start if start else None
            )
            if not start:
                self.tensorboard.add_text("recipe", "    " + recipe.to_yaml().replace("\n", "\n    "), 0)
        if config.wandb:
            wandb = _import("wandb", "wandb")
            id_file = self.workdir / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
            id_file.write_text(run_id + "\n")
            self.wandb_run = wandb.init(
                project=config.wandb_project,
                entity=config.wandb_entity,
                name=config.wandb_name or self.workdir.absolute().name,
                id=run_id,
                resume="allow",
                dir=str(self.workdir),
                config=recipe.resolved,
                allow_val_change=True,
                mode=config.wandb_mode,
                settings=wandb.Settings(console="off"),
            )

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` to metrics.jsonl and send its numbers to the other writers."""
        if jax.process_index() == 0:
            with open(self.workdir / METRICS_FILE, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        scalars = _scalars(record)
        step = int(record["step"])
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def locations(self) -> list[tuple[str, str]]:
        """(what, where) of each writer besides metrics.jsonl, for the closing summary."""
        places = []
        if self.tensorboard is not None:
            logdir = self.workdir / TENSORBOARD_DIR
            places.append(("tensorboard", f"{logdir} (view: tensorboard --logdir {logdir})"))
        if self.wandb_run is not None:
            run = self.wandb_run
            mode = run.settings.mode
            if mode == "offline":
                local = Path(run.dir).parent
                places.append(("wandb", f"offline run {local} (upload: wandb sync {local})"))
            elif mode != "disabled":
                places.append(("wandb", str(run.url)))
        return places

    def close(self, *, failed: bool = False) -> None:
        """Flush and close every writer."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)
