"""Sampling from a model over the mesh, and the sample files of a run directory."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
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
    parts of ``sampler`` (its arrays come in ``arrays``): ``num_samples`` sequences split
    over the mesh's devices. Sample i is drawn from ``fold_in(key, i)``
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
            return SampleOutput(tokens=output.tokens, num_function_evals=evals)

        condition_specs = jax.tree.map(lambda _: BATCH_SPEC, conditioning)
        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(replicated(sampler_arrays), specs, condition_specs),
            out_specs=SampleOutput(tokens=BATCH_SPEC, num_function_evals=P()),
            check_vma=False,
        )(sampler_arrays, params, conditioning)

    return sample


def sample_statistics(tokens: np.ndarray, vocab_size: int) -> dict[str, float]:
    """Unigram entropy of the sampled tokens (bits), and the fraction of distinct sequences."""
    counts = np.bincount(tokens.reshape(-1), minlength=vocab_size + 1).astype(np.float64)
    probs = counts / counts.sum()
    nonzero = probs[probs > 0]
    unique = len({row.tobytes() for row in tokens})
    return {
        "unigram_entropy_bits": float(-(nonzero * np.log2(nonzero)).sum()),
        "distinct_fraction": unique / max(len(tokens), 1),
    }


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
    label, guidance, ...); samples of image data also as a PNG grid. Returns the text
    file's path (on every process; process 0 writes)."""
    directory = Path(workdir) / SAMPLES_DIR
    if jax.process_index() != 0:
        return directory / f"{name}.txt"
    directory.mkdir(parents=True, exist_ok=True)
    tokens = np.asarray(output.tokens)
    text = "\n".join(recipe.data.decode(row) for row in tokens) + "\n"
    stats: dict[str, Any] = dict(sample_statistics(tokens, recipe.data.vocab_size))
    stats["num_function_evals"] = int(output.num_function_evals)
    stats["num_samples"] = int(tokens.shape[0])
    stats["sampler"] = recipe.names["sampler"]
    if conditioning:
        stats["conditioning"] = conditioning
    atomic_write_text(directory / f"{name}.txt", text)
    atomic_write_bytes(directory / f"{name}.npy", npy_bytes(tokens))
    atomic_write_text(directory / f"{name}.json", json.dumps(stats, indent=2) + "\n")
    if recipe.data.image_shape is not None:
        grid = image_grid(tokens, recipe.data.image_shape)
        atomic_write_bytes(directory / f"{name}.png", png_bytes(grid))
    return directory / f"{name}.txt"
