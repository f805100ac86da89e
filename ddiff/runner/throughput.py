"""Throughput: model FLOPs per token of a train step, the devices' peak FLOP/s, and model
FLOPs utilisation (MFU), as a run's metrics and ``ddiff bench`` report them.

MFU = train-step model FLOPs per token x tokens per second / peak FLOP/s of the devices.
Model FLOPs per token are three times the network's forward FLOPs per position
(:meth:`ddiff.AbstractNetwork.flops_per_token`; the backward pass costs two forward
passes). The peak is always that of the compute dtype (``precision.compute``), and comes
from, in order: the environment variable ``DDIFF_PEAK_FLOPS`` (FLOP/s of one device; on
CPU, of the host's cores together), either one number for every dtype or one per dtype
(``float32=494e12,bfloat16=989e12``); on GPU and TPU a table of the dense peaks of known
devices (:data:`ACCELERATOR_PEAKS`); on CPU a measurement, the fastest of a few
1024 x 1024 matrix products in the compute dtype, made once per process and dtype.
"""

import os
import time
from typing import Any

import jax
import jax.numpy as jnp

from ddiff._layers import COMPUTE_DTYPES
from ddiff._model import DiffusionModel

PEAK_ENV = "DDIFF_PEAK_FLOPS"
"""Environment variable overriding the peak FLOP/s of one device."""

ACCELERATOR_PEAKS: dict[str, dict[str, float]] = {
    # NVIDIA dense tensor-core peaks (SXM parts); float32 products run as TF32 under XLA's
    # default matmul precision, so float32 is compared with the TF32 rate.
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12},
    "A10": {"bfloat16": 125e12, "float16": 125e12, "float32": 62.5e12},
    # TPU bfloat16 peaks per chip; float32 products run as bfloat16 passes (default precision).
    "TPU v6": {"bfloat16": 918e12, "float32": 918e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
}
"""Dense peak FLOP/s per device by a fragment of ``jax.Device.device_kind`` and compute
dtype (vendors' data sheets)."""

_MEASURED: dict[str, float] = {}


def train_flops_per_token(model: DiffusionModel, seq_len: int) -> float | None:
    """Model FLOPs per token of one train step: 3 x the network's forward FLOPs per
    position, or None when the network does not state them."""
    forward = model.network.flops_per_token(seq_len)
    return None if forward is None else 3.0 * float(forward)


def measure_matmul_peak(dtype: Any = jnp.float32, *, size: int = 1024, repeats: int = 8) -> float:
    """FLOP/s (2 n^3 per product) of the fastest of ``repeats`` n x n products in
    ``dtype`` on the default device: a peak is a maximum, so on a shared machine the
    fastest run counts, not the median."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    product = jax.jit(jnp.dot)
    product(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def _peak_from_environment(text: str, compute: str) -> tuple[float | None, str]:
    """The peak ``DDIFF_PEAK_FLOPS`` gives for ``compute``: one number for every dtype, or
    ``dtype=number`` pairs separated by commas."""
    if "=" not in text:
        try:
            return float(text), PEAK_ENV
        except ValueError:
            return None, f"{PEAK_ENV}={text!r} is not a number"
    peaks = {}
    for pair in text.split(","):
        name, _, value = pair.partition("=")
        try:
            peaks[name.strip()] = float(value)
        except ValueError:
            return None, f"{PEAK_ENV}={text!r}: {pair.strip()!r} is not dtype=number"
    if compute not in peaks:
        return None, f"{PEAK_ENV}={text!r} gives no {compute} peak"
    return peaks[compute], f"{PEAK_ENV} ({compute})"


def peak_flops(compute: str = "float32", device: Any = None) -> tuple[float | None, str]:
    """Peak FLOP/s of one device (default: the first) for products in ``compute`` and where
    it comes from (``DDIFF_PEAK_FLOPS``, ``table: <kind>``, ``measured``), or None and the
    reason when unknown."""
    override = os.environ.get(PEAK_ENV)
    if override:
        return _peak_from_environment(override, compute)
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        if compute not in _MEASURED:
            _MEASURED[compute] = measure_matmul_peak(COMPUTE_DTYPES[compute])
        return _MEASURED[compute], "measured"
    for fragment, peaks in ACCELERATOR_PEAKS.items():
        if fragment.lower() in device.device_kind.lower():
            if compute in peaks:
                return peaks[compute], f"table: {fragment}"
            return None, f"no known {compute} peak for {device.device_kind!r}; set {PEAK_ENV}"
    return None, f"no known peak for {device.device_kind!r}; set {PEAK_ENV}"


def total_peak_flops(compute: str = "float32") -> float | None:
    """Peak FLOP/s of every device of the run: one device's peak times the devices (on
    CPU, the simulated devices of a process share its cores: the host's peak times the
    processes)."""
    peak, _ = peak_flops(compute)
    if peak is None:
        return None
    cpu = jax.devices()[0].platform == "cpu"
    return peak * (jax.process_count() if cpu else jax.device_count())


def mfu(
    tokens_per_second: float, flops_per_token: float | None, peak: float | None
) -> float | None:
    """Model FLOPs utilisation: model FLOPs per second over the peak (None if either is
    unknown)."""
    if flops_per_token is None or not peak:
        return None
    return tokens_per_second * flops_per_token / peak
