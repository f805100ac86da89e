"""TPU topologies to compile for on any host: libtpu (``pip install -e '.[tpu]'``) gives
the devices of a named topology (``v5p:4x4x4``) through
``jax.experimental.topologies``, whose programs the real TPU compiler compiles from
abstract inputs; nothing runs on them. With each generation's per-chip HBM and dense
peak, as the vendor's data sheets state them."""

import dataclasses
import importlib.util
import math
import re

import jax

from ddiff._errors import DdiffError

INSTALL_COMMAND = "pip install -e '.[tpu]'"
"""What installs libtpu (the ``tpu`` extra: ``jax[tpu]`` of the installed jax)."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """A TPU generation: its device kind, HBM, dense bfloat16 peak and HBM bandwidth
    (bytes/s) per chip, and the number of dimensions of its topology names (2: a torus of
    chips ``4x4``; 3: ``4x4x4``)."""

    name: str
    device_kind: str
    hbm_bytes: int
    peak_flops: float
    dims: int
    hbm_bandwidth: float


GIB = 1024**3

GENERATIONS: dict[str, Generation] = {
    generation.name: generation
    for generation in (
        Generation("v4", "TPU v4", 32 * GIB, 275e12, 3, 1228e9),
        Generation("v5e", "TPU v5 lite", 16 * GIB, 197e12, 2, 819e9),
        Generation("v5p", "TPU v5", 95 * GIB, 459e12, 3, 2765e9),
        Generation("v6e", "TPU v6 lite", 32 * GIB, 918e12, 2, 1640e9),
    )
}
"""The generations ``ddiff compile`` knows (HBM, bfloat16 dense peak and HBM bandwidth per
chip, from the data sheets; float32 products run as bfloat16 passes at XLA's default
precision, at the same peak)."""

EXAMPLES = "v4:2x2x1, v5e:2x2, v5e:4x4, v5e:8x8, v5p:2x2x1, v5p:4x4x4, v6e:2x2, v6e:8x8"
"""Topology names to suggest."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """The devices of a named TPU topology and what each holds and computes.

    Attributes:
        name: as asked for (``v5p:4x4x4``).
        generation: its :class:`Generation`.
        devices: the topology's devices (compile targets; nothing runs on them).
        chips: chips in the topology (the product of the name's sizes).
    """

    name: str
    generation: Generation
    devices: tuple[jax.Device, ...]
    chips: int

    @property
    def devices_per_chip(self) -> int:
        return max(len(self.devices) // self.chips, 1)

    @property
    def hbm_per_device(self) -> int:
        """HBM of one device (a chip's, shared by its devices where a chip has several)."""
        return self.generation.hbm_bytes // self.devices_per_chip

    @property
    def peak_per_device(self) -> float:
        """Dense bfloat16 peak FLOP/s of one device."""
        return self.generation.peak_flops / self.devices_per_chip

    @property
    def bandwidth_per_device(self) -> float:
        """HBM bytes/s of one device."""
        return self.generation.hbm_bandwidth / self.devices_per_chip


def _unknown(name: str, reason: str) -> DdiffError:
    known = ", ".join(GENERATIONS)
    return DdiffError(
        f"--topology {name}: {reason}; give GENERATION:SIZES with a generation of {known} "
        f"(e.g. {EXAMPLES})"
    )


def libtpu_installed() -> bool:
    """Whether libtpu can be loaded (``jax.experimental.topologies`` needs it)."""
    return importlib.util.find_spec("libtpu") is not None


def load_topology(name: str) -> Topology:
    """The devices of the TPU topology ``name`` (``v5e:4x4``, ``v5p:2x2x1``).

    Raises:
        DdiffError: one line for an unknown generation or malformed or impossible sizes
            (listing the known ones), or for libtpu missing (with the install command).
    """
    match = re.fullmatch(r"(v\d+[a-z]?):(\d+(?:x\d+)*)", name.strip())
    if match is None:
        raise _unknown(name, "not a topology name")
    generation = GENERATIONS.get(match.group(1))
    if generation is None:
        raise _unknown(name, f"unknown TPU generation {match.group(1)!r}")
    sizes = [int(size) for size in match.group(2).split("x")]
    if len(sizes) != generation.dims or min(sizes) < 1:
        example = "x".join(["2"] * generation.dims)
        raise _unknown(name, f"a {generation.name} topology has {generation.dims} sizes ({generation.name}:{example})")
    if not libtpu_installed():
        raise DdiffError(f"compiling for TPU needs libtpu, which is not installed; install it with: {INSTALL_COMMAND}")
    from jax.experimental import topologies  # loads libtpu: only when asked for

    try:
        description = topologies.get_topology_desc(topology_name=name.strip(), platform="tpu")
    except Exception as error:  # libtpu's own refusal of a shape it cannot build
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise _unknown(name, f"libtpu cannot build it ({reason})") from None
    return Topology(
        name=name.strip(), generation=generation, devices=tuple(description.devices), chips=math.prod(sizes)
    )
