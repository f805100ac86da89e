"""``ddiff compile RECIPE [overrides] [--topology NAME] [--mesh data=..,fsdp=..,model=..]``:
compile a recipe's train step, evaluation step and sampling loop ahead of time, from
abstract state (nothing of the model allocated), for the devices of a TPU topology
(libtpu: ``pip install -e '.[tpu]'``, on any host) or for this machine's, and report
per program what it needs per device and what the compiler's cost model says of it."""

import argparse
from pathlib import Path

import jax

from ddiff._errors import DdiffError, RecipeError
from ddiff.runner.commands.options import add_output, add_target, integer, output_path
from ddiff.runner.compile.programs import PROGRAMS, compile_recipe
from ddiff.runner.compile.report import Target, report_json, table
from ddiff.runner.compile.topology import load_topology
from ddiff.runner.files import atomic_write_text
from ddiff.runner.memory import format_bytes, mesh_bytes
from ddiff.runner.mesh import make_mesh
from ddiff.runner.recipe import Recipe, load_recipe
from ddiff.runner.throughput import peak_flops

NAME = "compile"
HELP = "compile a recipe's programs for a TPU topology (or this machine): memory, FLOPs, cost-model MFU"
DESCRIPTION = (
    "Compile the recipe's train step, evaluation step and sampling loop ahead of time from abstract "
    "state (no parameter allocated) for the devices of a TPU topology, e.g. --topology v5p:4x4x4 "
    "(needs libtpu: pip install -e '.[tpu]'), or for this machine's devices, and report per program "
    "the memory per device against the device's, model and XLA FLOPs, the cost model's time and MFU, "
    "the collectives and the compile time."
)
"""The command's name, its line in ``ddiff --help`` and the text atop its own help."""

MESH_AXES = ("data", "fsdp", "model")
"""The axes ``--mesh`` may size."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``compile`` command's arguments."""
    add_target(parser, "recipe", "recipe YAML file")
    parser.add_argument(
        "--topology",
        default=None,
        metavar="NAME",
        help="TPU topology GENERATION:SIZES, e.g. v5e:4x4, v5p:2x2x1 (default: this machine's devices)",
    )
    parser.add_argument(
        "--mesh",
        default=None,
        metavar="AXIS=SIZE,...",
        help="mesh sizes, e.g. data=2,fsdp=4,model=1 (-1: the remaining devices); default: the recipe's mesh",
    )
    parser.add_argument(
        "--programs", nargs="+", choices=PROGRAMS, default=list(PROGRAMS), help="programs to compile"
    )
    parser.add_argument(
        "--sample-batch", type=integer(1), default=None, help="samples the sampling loop draws (default: trainer.batch_size)"
    )
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="skip the second compilation with layer stacks traced out that counts FLOPs and the cost model's "
        "time (slow for deep networks): memory and collectives only",
    )
    add_output(parser, "also write the report to this JSON file")


def mesh_overrides(text: str | None) -> list[str]:
    """``--mesh data=2,fsdp=4`` as recipe overrides (``mesh.data=2``, ``mesh.fsdp=4``)."""
    if not text:
        return []
    overrides = []
    for part in text.split(","):
        axis, _, size = part.partition("=")
        axis = axis.strip()
        if axis not in MESH_AXES or not size.strip().lstrip("-").isdigit():
            raise RecipeError(
                f"--mesh {text}: {part.strip()!r} is not AXIS=SIZE with an axis of {', '.join(MESH_AXES)}",
                source="command line",
            )
        overrides.append(f"mesh.{axis}={int(size)}")
    return overrides


def _target(
    recipe: Recipe, topology_name: str | None
) -> tuple[list[jax.Device], str, int, float | None, float | None]:
    """The devices to compile for, their name, memory, peak and bandwidth per device."""
    compute = recipe.precision.compute
    if topology_name is None:
        devices = jax.devices()
        peak, _ = peak_flops(compute)
        if devices[0].platform == "cpu":  # simulated devices share the host
            peak = None if peak is None else peak / len(devices)
        return devices, "this machine", mesh_bytes(devices) // len(devices), peak, None
    topology = load_topology(topology_name)
    return (list(topology.devices), topology.name, topology.hbm_per_device, topology.peak_per_device,
            topology.bandwidth_per_device)  # fmt: skip


def run(args: argparse.Namespace) -> None:
    """Run ``ddiff compile``: the table on the terminal, the JSON report in ``--output``;
    a program that does not fit in a device's memory ends the command with one line
    saying what to change, after the report."""
    if args.output:
        output_path(Path(args.output), "--output", overwrite=args.overwrite)
    overrides = [*args.overrides, *mesh_overrides(args.mesh)]
    recipe = load_recipe(args.recipe, overrides)
    devices, name, memory, peak, bandwidth = _target(recipe, args.topology)
    mesh = make_mesh(recipe.mesh, devices)
    target = Target(
        name=name,
        device_kind=devices[0].device_kind,
        devices=mesh.size,
        memory_per_device=memory,
        peak_per_device=peak,
        mesh=dict(mesh.shape),
        compute=recipe.precision.compute,
        bandwidth_per_device=bandwidth,
    )
    programs = compile_recipe(
        recipe, mesh, programs=tuple(dict.fromkeys(args.programs)), sample_batch=args.sample_batch,
        progress=lambda program: print(f"compiling {program} ...", flush=True), count_cost=not args.memory_only,
    )  # fmt: skip
    print(table(programs, target), flush=True)
    if args.output:
        context = {"recipe": args.recipe, "overrides": overrides, "jax_version": jax.__version__}
        atomic_write_text(Path(args.output), report_json(programs, target, **context))
    too_large = [program for program in programs if program.refused or program.device_bytes > memory]
    if too_large:
        program = max(too_large, key=lambda p: p.device_bytes)
        needs = (
            f"{format_bytes(program.temp_bytes)} of temporaries"
            if program.refused
            else f"{format_bytes(program.device_bytes)} ({format_bytes(program.argument_bytes)} arguments, "
            f"{format_bytes(program.temp_bytes)} temporaries)"
        )
        raise DdiffError(
            f"{program.name} needs {needs} per device, more than the {format_bytes(memory)} of a "
            f"{target.device_kind}; shard more (mesh.fsdp, mesh.model), rematerialise (network.remat) or "
            f"lower {'eval' if program.name == 'eval_step' else 'trainer'}.batch_size"
        )
