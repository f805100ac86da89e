"""The engine: a recipe's compiled programs on a device mesh (the train step, the
held-out evaluation of each objective, sampling) and the state they run on, with no run
directory. The :class:`~ddiff.runner.Trainer` runs one in a run directory; ``ddiff eval``,
``ddiff sample``, ``ddiff quality`` and ``ddiff bench`` use one directly."""

from collections.abc import Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ddiff._errors import RecipeError
from ddiff._model import DiffusionModel
from ddiff._sampler import AbstractSampler, Conditioning, SampleOutput
from ddiff._tables import format_bytes
from ddiff.runner.memory import check_training_fits, mesh_bytes
from ddiff.runner.mesh import batch_shards, check_tensor_parallel, global_batch, make_mesh, to_host
from ddiff.runner.model import initial_model
from ddiff.runner.quality import Judge, sample_key, score_samples
from ddiff.runner.recipe import Recipe
from ddiff.runner.trainer.ahead import AheadOfTime, abstract_train_args, peak_bytes
from ddiff.runner.trainer.compiled import Bound, compiled
from ddiff.runner.trainer.evaluation import evaluate_split, make_eval
from ddiff.runner.trainer.optimizer import make_optimizer
from ddiff.runner.trainer.sampling import make_sample
from ddiff.runner.trainer.state import TrainState, initial_state, place_state
from ddiff.runner.trainer.step import make_train_step


def check_divisible(recipe: Recipe, devices: int) -> None:
    """Batch sizes must split evenly over the ``devices`` a batch is split over (data x
    fsdp: those along ``model`` share their rows)."""
    for path, value in (
        ("trainer.batch_size", recipe.trainer.batch_size),
        ("eval.batch_size", recipe.eval.batch_size),
    ):
        if value % devices:
            raise RecipeError(
                f"{value} is not divisible by the mesh's {devices} devices; use a multiple of {devices}",
                source=recipe.source,
                path=path,
            )


class Engine:
    """A recipe's compiled programs on ``mesh`` (default: the recipe's ``mesh`` section).

    They come from :func:`ddiff.runner.trainer.compiled.compiled`, so engines of equal
    recipes on the same mesh share them, and building an engine compiles nothing.

    Attributes:
        recipe: what it runs.
        mesh: where; batch sizes must be multiples of its devices.
        optimizer: the recipe's AdamW, as the train state holds its moments.
        train_step: ``(state, tokens, labels) -> (state, metrics, diagnostics)``, one
            jitted step with donated buffers (:func:`ddiff.runner.trainer.step.make_train_step`).
        eval_steps: ``(model, tokens, labels, key) -> nelbo`` per example of a global eval
            batch, by the prefix of its report: ``""`` for the recipe's objective,
            ``"<kind>_"`` for each of ``eval.objectives``.
        compile_ahead: whether :meth:`check_model` compiles the train step from the
            abstract state, checks XLA's memory analysis of it against the devices' memory
            and keeps that executable as :attr:`train_step` (default: on accelerators,
            where device memory is the limit; on CPU the shapes' lower bound suffices).
    """

    def __init__(self, recipe: Recipe, *, mesh: Mesh | None = None, compile_ahead: bool | None = None):
        self.recipe = recipe
        self.mesh = make_mesh(recipe.mesh) if mesh is None else mesh
        self.compile_ahead = jax.default_backend() != "cpu" if compile_ahead is None else compile_ahead
        check_divisible(recipe, batch_shards(self.mesh))
        self.optimizer = make_optimizer(recipe.optimizer, recipe.trainer.steps)
        self.train_step = compiled(
            make_train_step,
            (recipe.objective,),
            optimizer=recipe.optimizer,
            total_steps=recipe.trainer.steps,
            batch_size=recipe.trainer.batch_size,
            seq_len=recipe.data.seq_len,
            mesh=self.mesh,
        )
        objectives = [("", recipe.objective)]
        objectives += [(f"{name}_", objective) for name, objective in recipe.eval_objectives.values()]
        self.eval_steps = {
            prefix: compiled(make_eval, (objective,), batch_size=recipe.eval.batch_size, mesh=self.mesh)
            for prefix, objective in objectives
        }

    # ------------------------------------------------------------------ state and batches

    def check_model(self) -> None:
        """Build the recipe's model abstractly (``eqx.filter_eval_shape``: shapes only, no
        parameter allocated), so that what only the built network can tell (its
        capabilities against the objective's and the sampler's) is refused before
        anything is written, and so are heads that do not split over ``mesh.model`` and a
        training step too large for this machine's memory
        (:func:`~ddiff.runner.memory.check_training_fits`)."""
        shapes = eqx.filter_eval_shape(initial_model, self.recipe)
        check_tensor_parallel(shapes, self.mesh)
        devices = list(self.mesh.devices.flat)
        check_training_fits(self.recipe, shapes, mesh_bytes(devices))
        if self.compile_ahead and not isinstance(self.train_step, AheadOfTime):
            self.train_step = self._compile_train_step(mesh_bytes(devices) // len(devices))

    def _compile_train_step(self, device_bytes: int) -> AheadOfTime:
        """The train step compiled from the abstract state (nothing allocated), refused in
        one line if XLA's memory analysis exceeds ``device_bytes`` per device."""
        args = abstract_train_args(self.recipe, self.optimizer, self.mesh)
        step = AheadOfTime(self.train_step, args, mesh=self.mesh, donate=(0,))
        memory = step.compiled.memory_analysis()
        if memory is not None:
            needed = peak_bytes(memory)
            if needed > device_bytes:
                raise RecipeError(
                    f"the train step needs {format_bytes(needed)} per device (XLA's memory analysis, compiled "
                    f"before allocating), more than the {format_bytes(device_bytes)} of a "
                    f"{self.mesh.devices.flat[0].device_kind}; lower trainer.batch_size, shard more (mesh.fsdp, "
                    f"mesh.model) or set network.remat",
                    source=self.recipe.source,
                    path="trainer.batch_size",
                )
        return step

    def init_state(self) -> TrainState:
        """A fresh state of the recipe's seed, laid out on the mesh."""
        return initial_state(self.recipe, self.optimizer, self.mesh)

    def place(self, state: TrainState) -> TrainState:
        """Lay every array of ``state`` out on the mesh (fsdp-sharded where large)."""
        return place_state(state, self.mesh)

    def device_batch(self, batch: dict[str, np.ndarray]) -> tuple[jax.Array, jax.Array | None]:
        """This process's rows of a batch (``tokens``, and ``label`` when the data have
        classes), assembled into global arrays on the mesh."""
        tokens = global_batch(np.asarray(batch["tokens"]), self.mesh)
        labels = global_batch(np.asarray(batch["label"]), self.mesh) if "label" in batch else None
        return tokens, labels

    # ------------------------------------------------------------------ evaluation

    def evaluate(
        self, model: DiffusionModel, *, max_batches: int | None = None, max_examples: int | None = None
    ) -> dict[str, float]:
        """Negative ELBO over the eval split in bits per token, with its standard error
        over sequences (each sequence averaged over ``eval.time_draws`` draws), and in the
        data source's ``metric`` (bits per dim, bits per char or perplexity). Each of
        ``eval.objectives`` is evaluated with the same sequences and keys and reported
        with its kind as prefix (``score_entropy_bits_per_token``, ...)."""
        return evaluate_split(
            self.recipe,
            model,
            self.eval_steps,
            self.device_batch,
            max_batches=max_batches,
            max_examples=max_examples,
        )

    # ------------------------------------------------------------------ sampling

    def sample_program(self, *, sampler: AbstractSampler | None = None, seq_len: int | None = None) -> Bound:
        """``(model, key, first, num_samples, conditioning) -> SampleOutput`` for
        ``sampler`` (default: the recipe's) and ``seq_len`` positions (default: the
        data's): :func:`ddiff.runner.trainer.sampling.make_sample` on the mesh."""
        return compiled(
            make_sample,
            (self.recipe.sampler if sampler is None else sampler,),
            seq_len=self.recipe.data.seq_len if seq_len is None else seq_len,
            mesh=self.mesh,
        )

    def sample_batch(self, num_samples: int, batch_size: int | None = None) -> int:
        """The size of the batches :meth:`sample_batches` draws: ``batch_size`` (default
        all), at most ``num_samples``, rounded up to a multiple of the devices a batch is
        split over (data x fsdp)."""
        size = min(batch_size or num_samples, num_samples)
        shards = batch_shards(self.mesh)
        return -(-size // shards) * shards

    def sample_batches(
        self,
        model: DiffusionModel,
        *,
        key: jax.Array,
        num_samples: int,
        conditioning: Conditioning | None = None,
        batch_size: int | None = None,
        seq_len: int | None = None,
        sampler: AbstractSampler | None = None,
    ) -> Iterator[tuple[np.ndarray, int, np.ndarray]]:
        """Samples 0 .. ``num_samples`` - 1 of ``seq_len`` positions (default: the data's;
        at most, for a variable-length sampler) drawn by ``sampler`` (default: the
        recipe's) in batches (:meth:`sample_batch`), as (host tokens of the batch, network
        evaluations, host lengths of the samples). Sample i is drawn from
        ``fold_in(key, i)``, so the samples depend neither on the batch size nor on the
        mesh. Every batch runs one compiled program (the last is padded and trimmed);
        each array of ``conditioning`` has one row per sample, cut with the batches, or
        one row for every sample."""
        conditioning = conditioning or Conditioning()
        program = self.sample_program(sampler=sampler, seq_len=seq_len)
        size = self.sample_batch(num_samples, batch_size)
        arrays, static = eqx.partition(conditioning, eqx.is_array)
        arrays = jax.tree.map(np.asarray, arrays)
        for first in range(0, num_samples, size):
            count = min(size, num_samples - first)
            # Rows first .. first + count - 1, the last repeated to fill the batch.
            rows = np.minimum(np.arange(first, first + size), num_samples - 1)

            def cut(array, rows=rows):
                return global_batch(array[rows if len(array) > 1 else np.zeros_like(rows)], self.mesh)

            batch_conditioning = eqx.combine(jax.tree.map(cut, arrays), static)
            output = program(model, key, jnp.asarray(first, jnp.int32), size, batch_conditioning)
            yield (
                to_host(output.tokens)[:count],
                int(output.num_function_evals),
                to_host(output.lengths)[:count],
            )

    def sample(self, model: DiffusionModel, *, key: jax.Array, num_samples: int, **options: Any) -> SampleOutput:
        """Every batch of :meth:`sample_batches` (with its ``options``: ``conditioning``,
        ``batch_size``, ``seq_len``, ``sampler``) at once: ``num_samples`` sequences, all
        in one batch unless ``batch_size`` says otherwise, tokens and lengths on the host;
        ``num_function_evals`` is that of the costliest batch."""
        parts, lengths, evals = [], [], 0
        for tokens, batch_evals, batch_lengths in self.sample_batches(
            model, key=key, num_samples=num_samples, **options
        ):
            parts.append(tokens)
            lengths.append(batch_lengths)
            evals = max(evals, batch_evals)
        return SampleOutput(
            tokens=jnp.asarray(np.concatenate(parts)),
            num_function_evals=jnp.asarray(evals, jnp.int32),
            lengths=jnp.asarray(np.concatenate(lengths)),
        )

    def sample_quality(
        self, model: DiffusionModel, num_samples: int, *, judge: Judge | None = None
    ) -> dict[str, Any]:
        """Draw ``num_samples`` samples with the recipe's sampler (keyed by ``eval.seed``,
        so numbers are comparable across runs) and measure their quality
        (:func:`ddiff.runner.quality.score_samples`), scored by ``judge`` too when given:
        the ``samples`` entry of an evaluation under ``eval.samples``."""
        seed = self.recipe.eval.seed
        output = self.sample(model, key=sample_key(seed), num_samples=num_samples)
        return score_samples(output, self.recipe, judge=judge, seed=seed)
