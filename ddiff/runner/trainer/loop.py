"""The Trainer: runs a recipe in a run directory, resuming from its latest checkpoint."""

import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from ddiff._errors import DdiffError
from ddiff.runner.checkpoint import (
    checkpoint_manager,
    finish_saving,
    restore_latest,
    save_checkpoint,
)
from ddiff.runner.model import parameter_paths
from ddiff.runner.pipeline import train_batches, validate_batch
from ddiff.runner.plot import PLOT_FILE, plot_run
from ddiff.runner.recipe import Recipe
from ddiff.runner.throughput import mfu, total_peak_flops, train_flops_per_token
from ddiff.runner.trainer.engine import Engine
from ddiff.runner.trainer.rundir import (
    EVAL_FILE,
    RunLock,
    note,
    prepare_workdir,
    print_header,
    warn,
    write_eval,
)
from ddiff.runner.trainer.sampling import SAMPLES_DIR, SampleWriter
from ddiff.runner.trainer.signals import Stopped, StopSignals
from ddiff.runner.trainer.state import TrainState
from ddiff.runner.trainer.writers import METRICS_FILE, MetricWriters


class NonFiniteError(DdiffError):
    """A step produced a non-finite loss or gradient under ``on_nonfinite: halt``."""


class Trainer:
    """Runs a recipe in a work directory, resuming from its latest checkpoint.

    Its :class:`~ddiff.runner.trainer.engine.Engine` (``engine``: the model's state, the
    compiled step, evaluation and sampling, on ``mesh``) does the computing; the Trainer
    adds the run directory, checkpoints, metric writers and the schedule of logs,
    evaluations and samples. ``compile_ahead`` is the engine's (on accelerators by
    default): the train step compiled from the abstract state and checked against the
    devices' memory before the state is allocated.
    """

    def __init__(
        self,
        recipe: Recipe,
        workdir: str | Path,
        *,
        show_progress: bool | None = None,
        mesh: Mesh | None = None,
        compile_ahead: bool | None = None,
    ):
        self.recipe = recipe
        self.workdir = Path(workdir)
        self.show_progress = show_progress
        self.engine = Engine(recipe, mesh=mesh, compile_ahead=compile_ahead)
        self._writers: MetricWriters | None = None

    # ------------------------------------------------------------------ the run

    def run(self, *, stop_at_step: int | None = None, fresh: bool = False) -> TrainState:
        """Train to ``trainer.steps`` (or ``stop_at_step``), resuming from the newest intact
        checkpoint; with ``fresh``, an earlier run in the directory is moved aside first.
        The directory is locked for the run (:class:`~ddiff.runner.trainer.rundir.RunLock`).
        SIGTERM or SIGINT saves a checkpoint and raises :class:`Stopped`. Ends with a
        summary of where the results are."""
        self.engine.check_model()
        lock = self.prepare_workdir(fresh=fresh)
        try:
            state = self._run(stop_at_step)
        finally:
            lock.release()
        return state

    def _run(self, stop_at_step: int | None) -> TrainState:
        config = self.recipe.trainer
        data = self.recipe.data
        state = self.engine.init_state()
        iterator = train_batches(
            data,
            batch_size=config.batch_size // jax.process_count(),
            seed=self.recipe.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        manager = checkpoint_manager(self.workdir, config.keep_checkpoints)
        writers = None
        failed = True
        try:
            restored = restore_latest(manager, state, warn=warn)
            latest = None
            if restored is not None:
                state, iterator_state, latest = restored
                iterator.set_state(iterator_state)
            start = int(state.step)
            end = config.steps if stop_at_step is None else min(stop_at_step, config.steps)
            print_header(self.recipe, state, self.engine.mesh, start, end)
            writers = MetricWriters(self.workdir, self.recipe, start)
            self._writers = writers
            with StopSignals() as signals:
                state = self._loop(state, iterator, manager, start, end, signals)
                if latest is None or int(state.step) > latest:
                    save_checkpoint(manager, state, iterator.get_state())
                finish_saving(manager)
                if signals.received is not None and int(state.step) < end:
                    raise Stopped(signals.received, int(state.step), self.workdir)
            finished = int(state.step) >= config.steps
            if finished:
                self._finish(state, again=start >= config.steps)
            self._summary(state, manager, writers, finished)
            failed = False
        finally:
            if writers is not None:
                writers.close(failed=failed)
            self._writers = None
            manager.close()
        return state

    def prepare_workdir(self, *, fresh: bool = False) -> RunLock:
        """Lock the work directory (creating it) and check that it was made by the same
        recipe up to the changes a resume allows (moving an earlier run aside with
        ``fresh``); returns the held lock."""
        lock = prepare_workdir(self.workdir, self.recipe, fresh=fresh, note=note)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("ddiff: run directory prepared")
        return lock

    def _loop(
        self, state: TrainState, iterator, manager, start: int, end: int, signals: StopSignals
    ) -> TrainState:
        config = self.recipe.trainer
        data = self.recipe.data
        tokens_per_step = config.batch_size * data.seq_len
        flops_per_token = train_flops_per_token(state.model, data.seq_len)
        peak = total_peak_flops(self.recipe.precision.compute) if flops_per_token else None
        interactive = sys.stderr.isatty() if self.show_progress is None else self.show_progress
        bar = tqdm(
            total=end, initial=start, disable=not interactive, unit="step", dynamic_ncols=True
        )
        last_time, last_step = time.perf_counter(), start
        previous: tuple[int, dict, dict] | None = None
        for step in range(start, end):
            if signals.received is not None:
                break
            batch = next(iterator)
            if step == start:
                validate_batch(batch, data, "train split")
            tokens, labels = self.engine.device_batch(batch)
            state, metrics, diagnostics = self.engine.train_step(state, tokens, labels)
            done = step + 1
            if previous is not None:
                self._check_finite(*previous)
            previous = (done, metrics, diagnostics)
            if done % config.log_every == 0 or done == end:
                now = time.perf_counter()
                record = {k: float(v) for k, v in jax.device_get(metrics).items()}
                record["tokens_per_second"] = tokens_per_step * (done - last_step) / (now - last_time)
                utilisation = mfu(record["tokens_per_second"], flops_per_token, peak)
                if utilisation is not None:
                    record["mfu"] = utilisation
                last_time, last_step = now, done
                self._log({"step": done, "split": "train", **record})
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    bpt=f"{record['bits_per_token']:.3f}",
                    tok_s=f"{record['tokens_per_second']:.0f}",
                    **({"mfu": f"{utilisation:.1%}"} if utilisation is not None else {}),
                )
                if not interactive:
                    print(
                        f"step {done}/{end}  loss {record['loss']:.4f}  "
                        f"bits/token {record['bits_per_token']:.4f}  "
                        f"{record['tokens_per_second']:.0f} tokens/s"
                        + (f"  MFU {utilisation:.1%}" if utilisation is not None else "")
                        + (f"  skipped {int(record['skipped_steps'])}" if record["skipped_steps"] else ""),
                        flush=True,
                    )
            bar.update(1)
            if config.eval_every and done % config.eval_every == 0 and done != config.steps:
                result = self.engine.evaluate(state.ema, max_batches=config.eval_batches)
                self._log({"step": done, "split": "eval", **result})
                line = f"eval at step {done}: {self._eval_line(result)}"
                if interactive:
                    bar.write(line)
                else:
                    print(line, flush=True)
            if config.sample_every and done % config.sample_every == 0 and done != config.steps:
                self._samples(state, done)
            if done % config.checkpoint_every == 0 and done != end:
                save_checkpoint(manager, state, iterator.get_state())
        if previous is not None:
            self._check_finite(*previous)
        bar.close()
        return state

    def _check_finite(self, step: int, metrics: dict, diagnostics: dict) -> None:
        """Under ``on_nonfinite: halt``, stop with a report when step ``step`` had a
        non-finite loss or gradient (its update was not applied). Checked one step late,
        so the device is never left idle waiting for the host."""
        if self.recipe.trainer.on_nonfinite != "halt" or not bool(diagnostics["nonfinite"]):
            return
        values = jax.device_get(metrics)
        terms = [
            name.split("/", 1)[-1]
            for name, value in values.items()
            if (name in ("loss", "nelbo") or name.startswith("terms/")) and not np.isfinite(value)
        ]
        paths = parameter_paths(self.recipe)

        def listed(flags: jax.Array) -> str:
            bad = [path for path, ok in zip(paths, np.asarray(flags), strict=True) if not ok]
            return ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")

        bad_params, bad_grads = listed(diagnostics["finite_params"]), listed(diagnostics["finite_leaves"])
        raise NonFiniteError(
            f"step {step}: non-finite {', '.join(terms) or 'gradient'}"
            + (f"; non-finite parameters: {bad_params}" if bad_params else "")
            + (f"; non-finite gradients in {bad_grads}" if bad_grads else "")
            + "; the update was not applied and training halted "
            "(set trainer.on_nonfinite=skip to skip such steps)"
        )

    def _samples(self, state: TrainState, step: int) -> Path | None:
        config = self.recipe.trainer
        if config.num_samples == 0:
            return None
        key = jax.random.fold_in(jax.random.PRNGKey(self.recipe.seed + 1), step)
        writer = SampleWriter(self.workdir, self.recipe, f"step_{step:08d}", config.num_samples)
        try:
            for tokens, evals, lengths in self.engine.sample_batches(
                state.ema, key=key, num_samples=config.num_samples, batch_size=config.sample_batch_size
            ):
                writer.add(tokens, evals, lengths)
        except BaseException:
            writer.abort()
            raise
        return writer.close()

    def _eval_line(self, result: dict[str, float]) -> str:
        """An evaluation result on one line: bits per token and the data's metric."""
        metric = self.recipe.data.metric
        in_unit = (
            f" ({metric} {result[metric]:.4f} ± {result[f'{metric}_stderr']:.4f})"
            if metric != "bits_per_token"
            else ""
        )
        return (
            f"{result['bits_per_token']:.4f} ± {result['bits_per_token_stderr']:.4f} "
            f"bits/token{in_unit} over {result['num_tokens']} tokens"
        )

    def _finish(self, state: TrainState, *, again: bool = False) -> None:
        """Samples, the final evaluation (eval.json) and the plot at the end of training.
        ``again``: the run had already ended (run once more); only what is missing, after
        a crash at the very end, is done."""
        config = self.recipe.trainer
        step = int(state.step)
        samples = self.workdir / SAMPLES_DIR / f"step_{step:08d}.txt"
        if not (again and samples.exists()):
            self._samples(state, step)
        if config.final_eval and not (again and self._evaluated(step)):
            result = self.engine.evaluate(state.ema)
            if self.recipe.eval.samples:
                result["samples"] = self.engine.sample_quality(state.ema, self.recipe.eval.samples)
            write_eval(self.workdir, self.recipe, result, step)
            self._log({"step": step, "split": "eval", **result})
            print(f"eval at step {step}: {self._eval_line(result)}", flush=True)
        if self.recipe.logging.plot and jax.process_index() == 0:
            plot_run(self.workdir)

    def _evaluated(self, step: int) -> bool:
        """Whether eval.json holds the evaluation of ``step``."""
        try:
            return json.loads((self.workdir / EVAL_FILE).read_text()).get("step") == step
        except (OSError, ValueError, AttributeError):
            return False

    def _summary(self, state: TrainState, manager, writers: MetricWriters, finished: bool) -> None:
        """Where the run's results are, one line each."""
        if jax.process_index() != 0:
            return
        step = int(state.step)
        places = [("checkpoints", f"{manager.directory} (latest step {manager.latest_step()})")]
        places.append(("metrics", str(self.workdir / METRICS_FILE)))
        places += writers.locations()
        if finished and self.recipe.trainer.final_eval:
            places.append(("eval", str(self.workdir / EVAL_FILE)))
        samples = self.workdir / SAMPLES_DIR / f"step_{step:08d}.txt"
        if finished and samples.exists():
            places.append(("samples", f"{samples} (.npy, .json{', .png' if self.recipe.data.image_shape else ''})"))
        if finished and self.recipe.logging.plot:
            places.append(("plots", str(self.workdir / PLOT_FILE)))
        else:
            places.append(("plots", f"ddiff plot {self.workdir} draws {self.workdir / PLOT_FILE}"))
        status = "done" if finished else f"stopped at step {step} of {self.recipe.trainer.steps}; run the same command to go on"
        width = max(len(what) for what, _ in places)
        lines = [f"ddiff: {status}; run directory {self.workdir}"]
        lines += [f"  {what:<{width}}  {where}" for what, where in places]
        print("\n".join(lines), flush=True)

    def _log(self, record: dict[str, Any]) -> None:
        self._writers.write(record)
