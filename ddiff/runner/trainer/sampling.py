"""Sampling from a model over the mesh, and the sample files of a run directory."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ddiff._layers import gather_for_forward
from ddiff._sampler import AbstractSampler, Conditioning, SampleOutput, sample_keys
from ddiff._sharding import BATCH_AXES
from ddiff.runner.files import atomic_write_bytes, atomic_write_text, npy_bytes
from ddiff.runner.images import image_grid, png_bytes
from ddiff.runner.mesh import BATCH_SPEC, replicated, tree_specs
from ddiff.runner.recipe import Recipe

SAMPLES_DIR = "samples"


def make_sample(sampler: AbstractSampler, *, seq_len: int, mesh: Mesh) -> Callable:
    """``(arrays, model, key, num_samples, conditioning) -> SampleOutput`` for the static
    parts of ``sampler`` (its arrays come in ``arrays``): ``num_samples`` sequences of
    ``seq_len`` positions (at most, for a variable-length sampler) split over the mesh's
    devices, with every sample's length (``seq_len`` unless the sampler stopped it). Sample i is drawn from ``fold_in(key, i)``
    (:func:`ddiff.sample_keys`), each device passing the keys of its slice of the global
    batch, so the samples do not depend on the mesh or on ``num_samples``."""

    @eqx.filter_jit
    def sample(arrays, model, key, num_samples: int, conditioning: Conditioning) -> SampleOutput:
        (sampler_arrays,) = arrays
        params, static = eqx.partition(model, eqx.is_array)
        specs = tree_specs(params, mesh)
        local_samples = num_samples // mesh.size

        def local(sampler_arrays, params, conditioning):
            local_sampler = eqx.combine(sampler_arrays, sampler)
            full = eqx.combine(static, gather_for_forward(params, specs))
            first = jax.lax.axis_index(BATCH_AXES) * local_samples
            output = local_sampler.sample(
                full,
                keys=sample_keys(key, first, local_samples),
                seq_len=seq_len,
                conditioning=conditioning,
            )
            evals = jax.lax.pmax(output.num_function_evals, BATCH_AXES)
            lengths = output.lengths
            if lengths is None:
                lengths = jnp.full((local_samples,), output.tokens.shape[1], jnp.int32)
            return SampleOutput(tokens=output.tokens, num_function_evals=evals, lengths=lengths)

        condition_specs = jax.tree.map(lambda _: BATCH_SPEC, conditioning)
        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(replicated(sampler_arrays), specs, condition_specs),
            out_specs=SampleOutput(tokens=BATCH_SPEC, num_function_evals=P(), lengths=BATCH_SPEC),
            check_vma=False,
        )(sampler_arrays, params, conditioning)

    return sample


def sample_statistics(
    tokens: np.ndarray, vocab_size: int, lengths: np.ndarray | None = None
) -> dict[str, float]:
    """Unigram entropy of the sampled tokens (bits), and the fraction of distinct sequences;
    with ``lengths`` (variable-length samples), over each sample's first ``lengths[i]``
    tokens, and their mean, least and greatest length."""
    if lengths is None:
        lengths = np.full(len(tokens), tokens.shape[1])
    rows = [row[:length] for row, length in zip(tokens, lengths, strict=True)]
    flat = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    counts = np.bincount(flat, minlength=vocab_size + 1).astype(np.float64)
    probs = counts / max(counts.sum(), 1.0)
    nonzero = probs[probs > 0]
    unique = len({row.tobytes() for row in rows})
    stats = {
        "unigram_entropy_bits": float(-(nonzero * np.log2(nonzero)).sum()),
        "distinct_fraction": unique / max(len(tokens), 1),
    }
    if len(lengths) and (lengths < tokens.shape[1]).any():
        stats.update(
            mean_length=float(np.mean(lengths)), min_length=int(np.min(lengths)), max_length=int(np.max(lengths))
        )
    return stats


def write_samples(
    workdir: Path,
    recipe: Recipe,
    output: SampleOutput,
    name: str,
    *,
    conditioning: dict[str, Any] | None = None,
) -> Path:
    """Write samples under ``workdir/samples`` as text (one sequence a line), .npy, and a
    stats .json beside them (unigram entropy, network evaluations, and ``conditioning``:
    label, guidance, ...); samples of image data also as a PNG grid. Samples of a
    variable-length sampler (some shorter than the rest) are written up to their length
    in the text, hold ``ddiff.PAD_TOKEN`` (-1) after it in the .npy, and list their
    ``lengths`` in the .json. Returns the text file's path (on every process; process 0
    writes)."""
    directory = Path(workdir) / SAMPLES_DIR
    if jax.process_index() != 0:
        return directory / f"{name}.txt"
    directory.mkdir(parents=True, exist_ok=True)
    tokens = np.asarray(output.tokens)
    lengths = None if output.lengths is None else np.asarray(output.lengths)
    shown = tokens if lengths is None else [row[:length] for row, length in zip(tokens, lengths, strict=True)]
    text = "\n".join(recipe.data.decode(row) for row in shown) + "\n"
    stats: dict[str, Any] = dict(sample_statistics(tokens, recipe.data.vocab_size, lengths))
    stats["num_function_evals"] = int(output.num_function_evals)
    stats["num_samples"] = int(tokens.shape[0])
    stats["sampler"] = recipe.names["sampler"]
    if lengths is not None and (lengths < tokens.shape[1]).any():
        stats["lengths"] = [int(length) for length in lengths]
    if conditioning:
        stats["conditioning"] = conditioning
    atomic_write_text(directory / f"{name}.txt", text)
    atomic_write_bytes(directory / f"{name}.npy", npy_bytes(tokens))
    atomic_write_text(directory / f"{name}.json", json.dumps(stats, indent=2) + "\n")
    if recipe.data.image_shape is not None:
        grid = image_grid(tokens, recipe.data.image_shape)
        atomic_write_bytes(directory / f"{name}.png", png_bytes(grid))
    return directory / f"{name}.txt"
