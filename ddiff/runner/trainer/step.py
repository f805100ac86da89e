"""The compiled train step: objective, gradients reduced over the mesh, global-norm
clipping, AdamW, EMA and a guard that never applies a non-finite update, in one
``eqx.filter_jit`` with donated buffers around one ``jax.shard_map``, manual over the
mesh's ``data`` and ``fsdp`` axes and leaving ``model`` (tensor parallelism) to the
compiler."""

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ddiff._constant import is_constant, partition_trainable, trainable
from ddiff._layers import gather_for_forward
from ddiff._objective import AbstractObjective
from ddiff._sharding import BATCH_AXES
from ddiff.runner.config import OptimizerConfig
from ddiff.runner.mesh import (
    BATCH_SPEC,
    batch_shards,
    constrain,
    global_norm,
    manual_axes,
    manual_specs,
    reduce_gradients,
    replicated,
    tree_specs,
)
from ddiff.runner.trainer.optimizer import ema_decay_at, learning_rate_schedule, make_optimizer
from ddiff.runner.trainer.state import TrainState


def bits_per_token(nats: jax.Array, seq_len: int) -> jax.Array:
    """Nats per sequence of ``seq_len`` tokens in bits per token."""
    return nats / (seq_len * math.log(2.0))


def _nonfinite_per_leaf(tree: Any) -> jax.Array:
    """One int per leaf of this device's shard: 1 where the leaf has a non-finite entry."""
    flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)] or [jnp.bool_(True)]
    return (~jnp.stack(flags)).astype(jnp.int32)


def _all_finite_per_leaf(tree: Any) -> jax.Array:
    """Inside shard_map: one flag per leaf, true where the leaf is finite on every device."""
    return jax.lax.psum(_nonfinite_per_leaf(tree), BATCH_AXES) == 0


def _finite_params_when(finite: jax.Array, params: Any) -> jax.Array:
    """Inside shard_map: :func:`_all_finite_per_leaf` of ``params``, computed only for a
    non-finite step (the only one whose report reads it; a finite step passes every
    flag as true without reading the parameters)."""
    count = max(len(jax.tree.leaves(params)), 1)
    local = jax.lax.cond(
        finite, lambda: jnp.zeros((count,), jnp.int32), lambda: _nonfinite_per_leaf(params)
    )
    return jax.lax.psum(local, BATCH_AXES) == 0


def make_train_step(
    objective: AbstractObjective,
    *,
    optimizer: OptimizerConfig,
    total_steps: int,
    batch_size: int,
    seq_len: int,
    mesh: Mesh,
) -> Callable:
    """The step ``(arrays, state, tokens, labels) -> (state, metrics, diagnostics)`` for
    the static parts of ``objective`` (its arrays come in ``arrays``, see
    :func:`ddiff.runner.trainer.compiled.compiled`). The randomness of step k is
    ``fold_in(state.key, k)``; the batch is split over the mesh's data x fsdp devices, each
    taking its slice of the global batch's times and noise keys, so no draw depends on the
    split. Inside the ``shard_map`` each array is whole along ``model``, as the compiler
    sees it: the parameters a layer declares split over ``model`` stay split (the new state
    is laid out as the old), and the compiler partitions their products."""
    transform = make_optimizer(optimizer, total_steps)
    count = batch_shards(mesh)
    local_batch = batch_size // count
    learning_rate = learning_rate_schedule(optimizer, total_steps)

    def local_step(objective_arrays, dynamic, static, specs, tokens, labels):
        local_objective = eqx.combine(objective_arrays, objective)
        state = eqx.combine(dynamic, static)
        key = jax.random.fold_in(state.key, state.step)
        offset = jax.lax.axis_index(BATCH_AXES) * local_batch
        params, model_static = partition_trainable(state.model)

        def loss(params):
            # A Constant is one leaf of model_static (partition_trainable) and None in params.
            model = eqx.combine(model_static, gather_for_forward(params, specs), is_leaf=is_constant)
            terms = local_objective.per_example_terms(
                model, tokens, key=key, labels=labels, train=True, offset=offset, total=batch_size
            )
            terms = jax.tree.map(lambda a: jnp.mean(a, axis=0), terms)
            return terms.loss, terms

        (_, terms), grads = jax.value_and_grad(loss, has_aux=True)(params)
        grads = reduce_gradients(grads, specs, count)
        terms = jax.lax.pmean(terms, BATCH_AXES)
        grad_norm = global_norm(grads, specs)
        if optimizer.grad_clip is not None:
            scale = jnp.where(grad_norm < optimizer.grad_clip, 1.0, optimizer.grad_clip / grad_norm)
            clipped = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        else:
            clipped = grads
        updates, opt_state = transform.update(clipped, state.opt_state, params)
        new_params = eqx.apply_updates(params, updates)
        ema_params = trainable(state.ema)
        decay = ema_decay_at(state.step, optimizer.ema_decay)
        new_ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, new_params)
        finite_grads = _all_finite_per_leaf(grads)
        finite = jnp.all(finite_grads) & jnp.isfinite(terms.loss)
        finite_params = _finite_params_when(finite, params)

        def guard(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        metrics = {
            "loss": terms.loss,
            "nelbo": terms.nelbo,
            "bits_per_token": bits_per_token(terms.nelbo, seq_len),
            "grad_norm": grad_norm,
            "learning_rate": learning_rate(state.step),
            "skipped_steps": state.skipped_steps + (~finite).astype(jnp.int32),
            **{f"terms/{k}": v for k, v in terms.metrics.items()},
        }
        diagnostics = {
            "nonfinite": ~finite,
            "finite_leaves": finite_grads,
            "finite_params": finite_params,
        }
        new_state = TrainState(
            step=state.step + 1,
            model=eqx.combine(guard(new_params, params), model_static, is_leaf=is_constant),
            opt_state=guard(opt_state, state.opt_state),
            ema=eqx.combine(guard(new_ema, ema_params), model_static, is_leaf=is_constant),
            key=state.key,
            skipped_steps=metrics["skipped_steps"],
        )
        return eqx.filter(new_state, eqx.is_array), metrics, diagnostics

    @eqx.filter_jit(donate="all-except-first")
    def step(arrays, state: TrainState, tokens, labels):
        (objective_arrays,) = arrays
        dynamic, static = eqx.partition(state, eqx.is_array)
        specs = tree_specs(dynamic, mesh)
        manual = manual_specs(specs)
        param_specs = tree_specs(trainable(state.model), mesh)
        sharded = jax.shard_map(
            lambda o, d, x, y: local_step(o, d, static, param_specs, x, y),
            mesh=mesh,
            in_specs=(replicated(objective_arrays), manual, BATCH_SPEC, BATCH_SPEC),
            out_specs=(manual, P(), P()),
            axis_names=manual_axes(mesh),
            check_vma=False,
        )
        new_dynamic, metrics, diagnostics = sharded(objective_arrays, dynamic, tokens, labels)
        return eqx.combine(constrain(new_dynamic, mesh, specs), static), metrics, diagnostics

    return step
