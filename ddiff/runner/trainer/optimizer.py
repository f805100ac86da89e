"""AdamW with warmup and cosine decay, parameter groups, and the EMA's decay."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ddiff.runner.config import OptimizerConfig

SCHEDULE_PATH = ".process.schedule"
"""Where a model's schedule parameters lie (``jax.tree_util.keystr`` of their paths)."""


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate``, then cosine decay to
    ``final_lr_fraction`` of it at ``total_steps`` (or constant)."""
    if config.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=config.learning_rate,
            warmup_steps=config.warmup_steps,
            decay_steps=max(total_steps, config.warmup_steps + 1),
            end_value=config.learning_rate * config.final_lr_fraction,
        )
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1)),
            optax.constant_schedule(config.learning_rate),
        ],
        [config.warmup_steps],
    )


def _adamw(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    return optax.adamw(
        learning_rate_schedule(config, total_steps),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )


def parameter_groups(params: Any) -> Any:
    """``"schedule"`` for every leaf under the model's ``process.schedule``, ``"network"``
    for the others (the labels of ``optax.multi_transform``)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "schedule" if jax.tree_util.keystr(path).startswith(SCHEDULE_PATH) else "network",
        params,
    )


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW on :func:`learning_rate_schedule`. With ``config.schedule`` the parameters of
    the process's schedule get their own AdamW (:func:`parameter_groups`), whose unset
    settings are the network's. The trainer clips the gradient to ``grad_clip`` global
    norm before it (the norm of the whole gradient across the mesh, which an optax
    transform on one shard could not compute)."""
    if config.schedule is None:
        return _adamw(config, total_steps)
    group = dataclasses.replace(config, schedule=None, **config.schedule.settings())
    return optax.multi_transform(
        {"network": _adamw(config, total_steps), "schedule": _adamw(group, total_steps)},
        parameter_groups,
    )


def ema_decay_at(step: jax.Array, ema_decay: float) -> jax.Array:
    """EMA decay with warmup, min(decay, (1 + k) / (10 + k)) at step k, so a short run's
    average is not dominated by its initialisation."""
    return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
