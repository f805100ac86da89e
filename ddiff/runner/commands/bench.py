"""``ddiff bench [SHAPE ...] [--output FILE]``: time named shapes (:mod:`ddiff.runner.bench`)
and print each part's lines as soon as it is measured; every measurement also goes to
``--output``."""

import argparse
import os
from pathlib import Path

import jax

from ddiff._registry import default_registry
from ddiff.runner.bench import SHAPES, BenchError, bench_peak, bench_shape, shape_recipe
from ddiff.runner.bench.report import results_json
from ddiff.runner.commands.options import add_output, output_path
from ddiff.runner.files import atomic_write_text
from ddiff.runner.model import check_precision_runs

NAME = "bench"
HELP = "time named shapes: tokens/s, model FLOPs, MFU, compile time, memory, samplers"
DESCRIPTION = HELP
"""The command's name, its line in ``ddiff --help`` and the text atop its own help."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` command's arguments."""
    parser.add_argument(
        "shapes",
        nargs="*",
        metavar="SHAPE",
        help=f"named shapes (default md4-text8-small): {', '.join(SHAPES)}",
    )
    add_output(parser, "also write every measurement to this JSON file")
    parser.add_argument("--batch-size", type=int, help="train batch (default: the shape's)")
    parser.add_argument("--sample-batch", type=int, help="sampling batch (default: the shape's)")
    parser.add_argument(
        "--precision", choices=["float32", "bfloat16", "float16"], help="precision.compute"
    )
    parser.add_argument(
        "--repeats", type=int, help="timed train steps, median reported (default: the shape's)"
    )
    parser.add_argument("--sample-repeats", type=int, default=1, help="timed runs of each sampler")
    parser.add_argument(
        "--samplers",
        nargs="*",
        metavar="NAME",
        help="samplers to run (default: every registered one; none: --samplers)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override, e.g. network.scan_layers=true",
    )


def run(args: argparse.Namespace) -> None:
    """Run ``ddiff bench``: each shape's lines on the terminal, everything in ``--output``
    (its folder checked, and an existing file refused without ``--overwrite``, before
    anything is measured)."""
    names = args.shapes or ["md4-text8-small"]
    if args.output:
        output_path(Path(args.output), "--output", overwrite=args.overwrite)
    for name in names:
        if name not in SHAPES:
            raise BenchError(f"unknown shape {name!r}; known shapes: {', '.join(SHAPES)}")
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--sample-batch", args.sample_batch),
        ("--repeats", args.repeats),
    ):
        if value is not None and value < 1:
            raise BenchError(f"{flag} must be >= 1, got {value}")
    overrides = list(args.set) + ([f"precision.compute={args.precision}"] if args.precision else [])
    registered = default_registry().names("sampler")
    unknown = [name for name in args.samplers or [] if name not in registered]
    if unknown:
        raise BenchError(f"unknown sampler {unknown[0]!r}; registered: {', '.join(registered)}")
    first = shape_recipe(SHAPES[names[0]], batch_size=args.batch_size, overrides=overrides)
    check_precision_runs(first)
    compute = first.precision.compute
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    peak, source = bench_peak(compute)
    device = jax.devices()[0]
    shown = "unknown" if peak is None else f"{peak / 1e9:.1f} GFLOP/s"
    print(
        f"{device.platform} ({device.device_kind}) {compute} peak {shown} ({source}); load average {load}",
        flush=True,
    )
    results = []
    for name in names:
        result = bench_shape(
            SHAPES[name], batch_size=args.batch_size, sample_batch=args.sample_batch,
            overrides=overrides, repeats=args.repeats, sample_repeats=args.sample_repeats,
            samplers=args.samplers, report=lambda line: print(line, flush=True),
        )  # fmt: skip
        results.append(result)
    if args.output:
        payload = {
            "backend": device.platform,
            "device_kind": device.device_kind,
            "device_count": jax.device_count(),
            "jax_version": jax.__version__,
            "load_average": load,
            "precision": compute,
            "peak_flops": peak,
            "peak_source": source,
            "results": results,
        }
        atomic_write_text(Path(args.output), results_json(payload))
