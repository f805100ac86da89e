"""Time named shapes: ``python -m benchmarks [SHAPE ...] [--output FILE]``.

Examples:

    python -m benchmarks md4-text8-small --output bench.json
    python -m benchmarks md4-text8-small --set scan_layers=false --no-sampling
"""

import argparse
import json
import os
import sys

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="*", default=["md4-text8-small"])
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--repeats", type=int, default=10, help="timed train steps (median)")
    parser.add_argument("--sample-repeats", type=int, default=3)
    parser.add_argument("--no-sampling", action="store_true")
    parser.add_argument("--peak", type=float, help="peak FLOP/s to use instead of measuring it")
    parser.add_argument(
        "--compute-dtype", choices=["float32", "bfloat16"], default="float32",
        help="dtype of the networks' products and activations (parameters stay float32)",
    )  # fmt: skip
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="network recipe key to override (YAML value), e.g. scan_layers=false",
    )  # fmt: skip
    args = parser.parse_args()

    import jax.numpy as jnp

    from benchmarks import harness

    unknown = [name for name in args.shapes if name not in harness.SHAPES]
    if unknown:
        sys.exit(f"unknown shape {unknown[0]!r}; known shapes: {', '.join(harness.SHAPES)}")
    network = {}
    for item in args.set:
        key, _, value = item.partition("=")
        network[key] = yaml.safe_load(value)
    load = os.getloadavg()[0]
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.compute_dtype]
    peak = args.peak or harness.matmul_peak(dtype=dtype)
    print(f"{args.compute_dtype} matmul peak {peak / 1e9:.1f} GFLOP/s; load average {load:.2f}")
    results = []
    for name in args.shapes:
        result = harness.bench_shape(
            harness.SHAPES[name], peak=peak, network=network, repeats=args.repeats,
            sample_repeats=args.sample_repeats, sampling=not args.no_sampling,
            compute_dtype=None if args.compute_dtype == "float32" else args.compute_dtype,
        )  # fmt: skip
        print(harness.format_result(result, peak), flush=True)
        results.append(result)
    if args.output:
        payload = {"peak_flops": peak, "load_average": load, "results": results}
        with open(args.output, "w") as handle:
            json.dump(payload, handle, indent=2, default=str)


if __name__ == "__main__":
    main()
