"""A recipe's programs compiled ahead of time for a device mesh from abstract inputs:
the train step, the evaluation step and the sampling loop, each lowered from
``jax.ShapeDtypeStruct`` leaves laid out as a run lays out its arrays (no parameter is
allocated) and compiled by the mesh's backend, with what the compiler reports of it."""

import dataclasses
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddiff._layers import traced_out
from ddiff._sampler import Conditioning
from ddiff.runner.compile.hlo import Collective, collectives
from ddiff.runner.recipe import Recipe
from ddiff.runner.throughput import train_flops_per_token
from ddiff.runner.trainer.ahead import (
    abstract_batch,
    abstract_train_args,
    lower_and_compile,
    scans_layers,
)
from ddiff.runner.trainer.compiled import Bound
from ddiff.runner.trainer.engine import Engine

PROGRAMS = ("train_step", "eval_step", "sample")
"""The programs a recipe runs, in the order they are compiled and reported."""


@dataclasses.dataclass(frozen=True)
class CompiledProgram:
    """What the compiler says of one program on one device of the mesh.

    Attributes:
        name: one of :data:`PROGRAMS`.
        batch: the global batch it was compiled for.
        argument_bytes, output_bytes, alias_bytes, temp_bytes, code_bytes: per device,
            from ``memory_analysis()`` (aliased bytes are outputs written into donated
            arguments, counted once).
        xla_flops: FLOPs of one execution summed over the devices (``cost_analysis()``
            of the program with its layer stacks traced out, :func:`ddiff._layers.traced_out`:
            XLA counts a loop body once; a sampling loop's body, one step, is still
            counted once).
        bytes_accessed: HBM bytes of one execution on one device (the same analysis).
        optimal_seconds: the cost model's time of one execution (the same analysis;
            None where the backend has no cost model, as on CPU).
        model_flops: the network's model FLOPs of one execution (train step: 3 x the
            forward FLOPs per token x tokens; None for the other programs or a network
            that does not state its FLOPs).
        collectives: cross-device operations per execution.
        compile_seconds: lowering and compiling.
        refused: the compiler's reason where it refused the program for want of device
            memory (the byte counts then hold what its message states, the rest zero).
    """

    name: str
    batch: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    xla_flops: float
    bytes_accessed: float
    optimal_seconds: float | None
    model_flops: float | None
    collectives: tuple[Collective, ...]
    compile_seconds: float
    refused: str | None = None

    @property
    def device_bytes(self) -> int:
        """Memory one device needs while the program runs: arguments, outputs not
        written into donated arguments, temporaries and code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


def _cost(compiled: Any) -> dict[str, float]:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    return dict(analysis or {})


_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_TEMPORARIES = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)")


def _refused(name: str, batch: int, message: str, seconds: float, model_flops: float | None) -> CompiledProgram:
    """The report of a program the compiler refused for want of device memory, with the
    temporaries its message states."""
    reason = next((line for line in message.splitlines() if "RESOURCE_EXHAUSTED" in line), message)
    reason = reason.split("RESOURCE_EXHAUSTED:", 1)[-1].strip()
    found = _TEMPORARIES.search(message)
    temporaries = int(float(found.group(1)) * _UNITS[found.group(2)]) if found else 0
    return CompiledProgram(
        name=name, batch=batch, argument_bytes=0, output_bytes=0, alias_bytes=0, temp_bytes=temporaries,
        code_bytes=0, xla_flops=0.0, bytes_accessed=0.0, optimal_seconds=None, model_flops=model_flops,
        collectives=(), compile_seconds=seconds, refused=reason,
    )  # fmt: skip


def compile_program(
    name: str, bound: Bound, args: tuple[Any, ...], *, mesh: Mesh, batch: int,
    donate: tuple[int, ...] = (), model_flops: float | None = None, count_cost: bool = True,
) -> CompiledProgram:
    """:func:`lower_and_compile` ``bound`` on ``args`` and read what the compiler says of
    it; where a layer stack of ``args`` runs as a loop, the FLOPs and the cost model's
    time come from a second compilation with every stack traced out (XLA counts a loop's
    body once), or, without ``count_cost``, are not counted (zero FLOPs and bytes, no
    time): memory and collectives only, for networks slow to compile unrolled."""
    start = time.perf_counter()
    try:
        compiled = lower_and_compile(bound, args, mesh=mesh, donate=donate)
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return _refused(name, batch, str(error), time.perf_counter() - start, model_flops)
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    if not scans_layers(args, mesh):
        cost = _cost(compiled)
    elif count_cost:
        cost = _cost(lower_and_compile(bound, traced_out(args), mesh=mesh, donate=donate))
    else:
        cost = {}
    optimal = cost.get("optimal_seconds")
    return CompiledProgram(
        name=name,
        batch=batch,
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        xla_flops=float(cost.get("flops", 0.0)) * mesh.size,
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        optimal_seconds=None if optimal is None or optimal <= 0 else float(optimal),
        model_flops=model_flops,
        collectives=tuple(collectives(compiled.as_text())),
        compile_seconds=seconds,
    )


def compile_recipe(
    recipe: Recipe, mesh: Mesh, *, programs: tuple[str, ...] = PROGRAMS, sample_batch: int | None = None,
    progress: Callable[[str], None] | None = None, count_cost: bool = True,
) -> list[CompiledProgram]:
    """Compile ``programs`` of ``recipe`` for ``mesh`` from its abstract fresh state: the
    train step on a ``trainer.batch_size`` batch, the evaluation step of the recipe's
    objective on an ``eval.batch_size`` batch, the recipe's sampler on ``sample_batch``
    samples (default ``trainer.batch_size``) of ``data.seq_len`` positions; ``count_cost``
    as :func:`compile_program`."""
    engine = Engine(recipe, mesh=mesh)
    train_args = abstract_train_args(recipe, engine.optimizer, mesh)
    state = train_args[0]
    seq_len = recipe.data.seq_len
    classes = recipe.data.num_classes > 0
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P()))
    results = []
    for name in programs:
        if progress is not None:
            progress(name)
        if name == "train_step":
            batch = recipe.trainer.batch_size
            flops = train_flops_per_token(state.model, seq_len)
            results.append(compile_program(
                name, engine.train_step, train_args, mesh=mesh, batch=batch, donate=(0,),
                model_flops=None if flops is None else flops * batch * seq_len, count_cost=count_cost,
            ))
        elif name == "eval_step":
            batch = recipe.eval.batch_size
            args = (state.model, abstract_batch(batch, seq_len, mesh), abstract_batch(batch, None, mesh) if classes else None, key)
            results.append(compile_program(name, engine.eval_steps[""], args, mesh=mesh, batch=batch, count_cost=count_cost))
        elif name == "sample":
            batch = engine.sample_batch(sample_batch or recipe.trainer.batch_size)
            first = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
            args = (state.model, key, first, batch, Conditioning())
            results.append(compile_program(name, engine.sample_program(), args, mesh=mesh, batch=batch, count_cost=count_cost))
        else:
            raise ValueError(f"unknown program {name!r}; known: {', '.join(PROGRAMS)}")
    return results
