"""What a sampling run asks beyond the recipe (``ddiff sample``'s options): a class label
and the classifier-free guidance weight, given tokens (a prefix, or an array of fixed
positions), a start from the prior, and the samples' length; checked against the recipe
and turned into a :class:`ddiff.Conditioning`. Every refusal is one
:class:`~ddiff.RecipeError` naming the option."""

import dataclasses
import os
import stat

import jax.numpy as jnp
import numpy as np

from ddiff._capabilities import VARIABLE_LENGTH
from ddiff._errors import RecipeError
from ddiff._sampler import Conditioning
from ddiff.runner.recipe import Recipe


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """A sampling run's options, as ``ddiff sample`` takes them.

    Attributes:
        label: class label of a class-conditional model (None: unconditional).
        guidance: classifier-free guidance weight w, (1 + w) cond - w uncond (needs a label).
        prefix: token ids that start every sample, as text (``"3 4 5"``).
        fixed: path of an integer .npy array of shape (seq,) or (num, seq): entries >= 0
            are kept fixed, -1 marks positions to generate.
        start_from_prior: start a masked process from its prior draw instead of all-mask.
        max_length: tokens per sample for a sampler that stops at an end token (None: the
            data's length).
    """

    label: int | None = None
    guidance: float = 0.0
    prefix: str | None = None
    fixed: str | None = None
    start_from_prior: bool = False
    max_length: int | None = None


MAX_GUIDANCE = 1e6
"""The largest guidance weight |w|: (1 + w) cond - w uncond stays finite in float32."""


def _refuse(message: str) -> RecipeError:
    return RecipeError(message, source="command line")


def _check_token_range(low: int, high: int, vocab_size: int) -> None:
    if low < -1 or high >= vocab_size:
        raise _refuse(
            f"given token ids must be in 0..{vocab_size - 1} (or -1 for a free position), "
            f"got {low}..{high}"
        )


def _load_fixed(path: str) -> np.ndarray:
    """The ``--fixed`` array: a regular .npy file (not a device, FIFO or .npz archive)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise _refuse(f"--fixed {path}: cannot read a .npy array ({error.strerror})") from None
    if not stat.S_ISREG(mode):
        raise _refuse(f"--fixed {path}: not a regular file; give a .npy array file")
    try:
        given = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise _refuse(f"--fixed {path}: cannot read a .npy array ({error})") from None
    if not isinstance(given, np.ndarray):
        given.close()
        raise _refuse(f"--fixed {path}: an .npz archive; give one .npy array (np.save)")
    return given


def given_tokens(
    options: SampleOptions, num: int, seq_len: int, vocab_size: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """The (tokens, mask) of ``prefix`` or ``fixed``, each of shape (1, seq_len) (the same
    for every sample) or (num, seq_len), or None when neither is given."""
    if options.prefix is not None:
        try:
            prefix = [int(token) for token in options.prefix.replace(",", " ").split()]
        except ValueError:
            raise _refuse(f"--prefix {options.prefix!r} is not a list of token ids") from None
        if not prefix or len(prefix) > seq_len:
            raise _refuse(f"--prefix needs 1 to {seq_len} token ids, got {len(prefix)}")
        _check_token_range(min(prefix), max(prefix), vocab_size)
        given = np.full((1, seq_len), -1, np.int64)
        given[0, : len(prefix)] = prefix
    elif options.fixed is not None:
        given = _load_fixed(options.fixed)
        if not np.issubdtype(given.dtype, np.integer):
            raise _refuse(f"--fixed {options.fixed}: needs integer token ids, got {given.dtype}")
        if given.shape not in ((seq_len,), (num, seq_len)):
            raise _refuse(
                f"--fixed {options.fixed}: shape {given.shape}, expected ({seq_len},) or "
                f"({num}, {seq_len}) (--num {num}, sequence length {seq_len})"
            )
        given = given.reshape(-1, seq_len)
    else:
        return None
    _check_token_range(int(given.min()), int(given.max()), vocab_size)
    return np.maximum(given, 0).astype(np.int32), given >= 0


def build_conditioning(
    options: SampleOptions, recipe: Recipe, num: int, seq_len: int | None = None
) -> tuple[Conditioning, dict[str, object]]:
    """The conditioning of ``num`` samples of ``seq_len`` positions (default: the data's),
    and its description for the samples' statistics (label, guidance, number of fixed
    positions, start from the prior)."""
    data = recipe.data
    info: dict[str, object] = {}
    labels = None
    if not abs(options.guidance) <= MAX_GUIDANCE:
        raise _refuse(f"--guidance must be in -{MAX_GUIDANCE:g}..{MAX_GUIDANCE:g}, got {options.guidance:g}")
    if options.label is not None:
        if data.num_classes == 0:
            raise _refuse(
                f"--label needs a class-conditional model, but data {recipe.names['data']!r} "
                f"has no classes"
            )
        if not 0 <= options.label < data.num_classes:
            raise _refuse(f"--label must be in 0..{data.num_classes - 1}, got {options.label}")
        labels = jnp.full((1,), options.label, jnp.int32)
        info["label"] = options.label
    if options.guidance != 0.0:
        if labels is None:
            raise _refuse(
                "--guidance needs --label (classifier-free guidance mixes the labelled and "
                "the null-class predictions)"
            )
        info["guidance"] = options.guidance
    given = given_tokens(options, num, seq_len or data.seq_len, data.vocab_size)
    fixed_tokens = fixed_mask = None
    if given is not None:
        fixed_tokens, fixed_mask = jnp.asarray(given[0]), jnp.asarray(given[1])
        info["num_fixed_positions"] = int(given[1].sum()) * (num if len(given[1]) == 1 else 1)
    if options.start_from_prior:
        info["start_from_prior"] = True
    conditioning = Conditioning(
        labels=labels,
        fixed_tokens=fixed_tokens,
        fixed_mask=fixed_mask,
        guidance=options.guidance,
        start_from_prior=options.start_from_prior,
    )
    return conditioning, info


def sample_length(options: SampleOptions, recipe: Recipe) -> int:
    """The positions to sample: the data's, or ``max_length`` for a variable-length
    sampler."""
    if options.max_length is None:
        return recipe.data.seq_len
    if VARIABLE_LENGTH not in recipe.sampler.capabilities():
        raise _refuse(
            f"--max-length needs a sampler that stops at an end token (capability "
            f"{VARIABLE_LENGTH}, e.g. bd3lm); sampler {recipe.names['sampler']!r} draws "
            f"{recipe.data.seq_len} tokens"
        )
    return options.max_length
