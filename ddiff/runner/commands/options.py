"""What the commands' parsers share: argument types that refuse a bad value before
anything is loaded, the help of recipe overrides, the option groups several commands
take, and the checks of output paths and run directories."""

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ddiff._errors import RecipeError, RunDirectoryError

OVERRIDES_HELP = (
    "recipe overrides key.path=value, before or after the options; section=NAME or "
    "section='{kind: NAME, key: value}' replaces a whole section"
)

MAX_SAMPLES = 2**31 - 1
"""Sample indices fold into 32-bit keys (:func:`ddiff.sample_keys`)."""

MAX_INTEGER = 2**63 - 1
"""The largest integer an option takes (a signed 64-bit integer)."""

MAX_MAGNITUDE = float(np.finfo(np.float32).max)
"""The largest magnitude of a real-valued option: the device computes in float32."""


def integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [minimum, maximum] (``maximum`` at most
    :data:`MAX_INTEGER`), its length bounded before conversion."""
    highest = MAX_INTEGER if maximum is None else min(maximum, MAX_INTEGER)

    def parse(text: str) -> int:
        digits = text.strip()
        upper = f" and <= {maximum}" if maximum is not None else ""
        if len(digits) > len(str(MAX_INTEGER)) + 1 and digits.lstrip("+-").isdigit():
            raise argparse.ArgumentTypeError(
                f"must be >= {minimum}{upper}, got an integer of {len(digits)} characters"
            )
        try:
            value = int(digits)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or value > highest:
            upper = f" and <= {highest}" if maximum is not None or value > highest else ""
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{upper}, got {value}")
        return value

    return parse


def finite(text: str) -> float:
    """An argparse type: a finite real number of magnitude at most :data:`MAX_MAGNITUDE`,
    checked in float64."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    if abs(value) > MAX_MAGNITUDE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_MAGNITUDE:.3g} in magnitude, got {text!r}")
    return value


def add_specs(parser: argparse.ArgumentParser, slot: str, note: str = "") -> None:
    """The required option ``--SLOT SPEC``, given once per component: a registered name,
    or a YAML mapping with ``kind`` and the component's keys (``note`` ends its help)."""
    parser.add_argument(
        f"--{slot}",
        action="append",
        required=True,
        metavar="SPEC",
        help=f"a registered {slot}, NAME or '{{kind: NAME, key: value}}'; give it once per {slot}{note}",
    )


SEED = integer(0, 2**32 - 1)
"""An argparse type: a seed, an integer in [0, 2^32 - 1]."""


def add_target(
    parser: argparse.ArgumentParser, name: str, text: str, overrides: str = OVERRIDES_HELP
) -> None:
    """The positional ``name`` (a run directory or a recipe file, ``text`` its help)
    followed by the recipe overrides (``overrides`` their help)."""
    parser.add_argument(name, help=text)
    parser.add_argument("overrides", nargs="*", help=overrides)


def add_seed(parser: argparse.ArgumentParser, text: str) -> None:
    """The option ``--seed`` (default 0), ``text`` its help."""
    parser.add_argument("--seed", type=SEED, default=0, help=text)


def add_batch_size(parser: argparse.ArgumentParser, text: str) -> None:
    """The option ``--batch-size``, a positive integer (default None: the recipe's),
    ``text`` its help."""
    parser.add_argument("--batch-size", type=integer(1), default=None, help=text)


def add_judge(parser: argparse.ArgumentParser, text: str) -> None:
    """The option ``--judge JUDGE_RUN``: a run whose likelihood scores the samples
    (``text`` its help)."""
    parser.add_argument("--judge", default=None, metavar="JUDGE_RUN", help=text)


def add_start_from_prior(parser: argparse.ArgumentParser) -> None:
    """The flag ``--start-from-prior`` (:attr:`ddiff.Conditioning.start_from_prior`)."""
    parser.add_argument(
        "--start-from-prior",
        action="store_true",
        help="start a masked process from its prior draw instead of all-mask",
    )


def add_output(parser: argparse.ArgumentParser, text: str) -> None:
    """The option ``--output`` (a JSON file, checked by :func:`output_path`) and the flag
    ``--overwrite`` that lets it replace an existing file (``text`` the help of
    ``--output``)."""
    parser.add_argument("--output", default=None, help=text)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def output_path(path: Path, option: str, overwrite: bool) -> Path:
    """Refuse an output path whose folder is missing or not writable, or an existing file
    unless ``overwrite``: before the command computes anything."""
    if "\x00" in str(path):
        raise RecipeError(f"{option} {str(path)!r} contains a NUL character; give a file name", source="command line")
    if not path.parent.is_dir():
        raise RecipeError(
            f"{option} {path}: folder {path.parent} does not exist; create it first",
            source="command line",
        )
    if path.is_dir():
        raise RecipeError(f"{option} {path} is a directory; give a file name", source="command line")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise RecipeError(
            f"{option} {path}: folder {path.parent} is not writable; choose another folder or make it writable",
            source="command line",
        )
    if path.exists() and not overwrite:
        raise RecipeError(
            f"{option} {path} exists; choose another name or add --overwrite", source="command line"
        )
    return path


def run_directory(workdir: str) -> Path:
    """The run directory ``workdir``, refused when it is a file."""
    path = Path(workdir)
    if path.exists() and not path.is_dir():
        raise RunDirectoryError(f"{path} is a file, not a run directory")
    return path
