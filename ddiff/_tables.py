"""Tables a component builds from recipe sizes (transition matrices, draws), checked against
this machine's physical memory before any of them is allocated."""

import math
import os
from collections.abc import Sequence

from ddiff._errors import RecipeError


def physical_memory_bytes() -> int:
    """Physical memory of this machine (``SC_PHYS_PAGES * SC_PAGE_SIZE``)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def format_bytes(count: float) -> str:
    """``count`` bytes in binary units (``7.45 GiB``)."""
    if count < 1024:
        return f"{count:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        count /= 1024
        if count < 1024:
            return f"{count:.3g} {unit}"
    return f"{count / 1024:.3g} PiB"


def check_table_fits(
    shape: Sequence[int],
    bytes_per_entry: float,
    *,
    what: str,
    path: str,
    change: str | None = None,
) -> None:
    """Refuse a table of ``shape`` holding ``bytes_per_entry`` bytes per entry while it is
    built and kept (8 for one float64 table, 48 for six) when prod(shape) x
    bytes_per_entry exceeds this machine's physical memory. Call it before allocating
    anything of the table: the product is taken in Python integers, so no size overflows.

    Arguments:
        shape: the table's shape (``(V, V)`` for a transition matrix).
        bytes_per_entry: bytes held per entry, every copy and work table counted.
        what: the table, as the message names it (``the 16 x 16 transition matrix``).
        path: the recipe key that sets the size, relative to the component's section
            (the recipe builder adds the section: ``data.num_symbols``).
        change: what the message asks to change; by default ``lower <path>``.

    Raises:
        RecipeError: at ``path``: ``what needs about 113 GiB, more than this machine's
            23.5 GiB of memory; lower num_symbols``.
    """
    needed = math.prod(int(size) for size in shape) * bytes_per_entry
    available = physical_memory_bytes()
    if needed > available:
        raise RecipeError(
            f"{what} needs about {format_bytes(needed)}, more than this machine's "
            f"{format_bytes(available)} of memory; {change or f'lower {path}'}",
            path=path,
        )
