"""The benchmark's output: the lines of its terminal table and its JSON file."""

import json
from typing import Any

import numpy as np


def format_result(result: dict[str, Any]) -> str:
    """The train-step lines of the terminal table."""
    memory = result["memory"].get("peak_bytes", 0) / 2**20
    mfu = "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
    peak = (
        f"the {result['peak_precision']} peak, unknown ({result['peak_source']})"
        if not result["peak_flops"]
        else f"the {result['peak_precision']} peak {result['peak_flops'] / 1e9:.0f} GFLOP/s ({result['peak_source']})"
    )
    ratio = (
        "n/a" if result["xla_over_model_flops"] is None else f"{result['xla_over_model_flops']:.3f}"
    )
    flops = (
        "n/a" if result["flops_per_token"] is None else f"{result['flops_per_token'] / 1e6:.2f}M"
    )
    return "\n".join(
        [
            f"{result['shape']}: {result['description']}; batch {result['batch_size']}, {result['precision']}",
            f"  parameters {result['parameters']:,}; model FLOPs/token {flops} = {result['flops_formula']}",
            f"  XLA cost analysis / model FLOPs {ratio} ({result['xla_check_program']})",
            f"  train step {result['step_seconds'] * 1e3:9.1f} ms  {result['tokens_per_second']:9.0f} tokens/s  "
            f"MFU {mfu} of {peak}  compile {result['compile_seconds']:.1f} s  peak memory {memory:.0f} MiB",
        ]
    )


def format_sampler(name: str, sampler: dict[str, Any]) -> str:
    """One sampler's line of the terminal table."""
    if "skipped" in sampler:
        return f"  sampler {name:<16} skipped: {sampler['skipped']}"
    return (
        f"  sampler {name:<16} {sampler['seconds_per_evaluation'] * 1e3:8.1f} ms/evaluation "
        f"({sampler['evaluation_over_forward']:.2f} x one forward pass of {sampler['forward_seconds'] * 1e3:.1f} ms), "
        f"{sampler['evaluations_per_sample']} evaluations/sample, host callbacks {sampler['host_callbacks']}, "
        f"{sampler['family']}"
    )


def results_json(payload: dict[str, Any]) -> str:
    """The ``--output`` file's text: ``payload`` as indented JSON."""
    return json.dumps(payload, indent=2, default=_json_default) + "\n"


def _json_default(value: Any) -> Any:
    """NumPy scalars as numbers, tuples as lists, anything else as its text."""
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)
