"""Sampling from a model over the mesh, and the sample files of a run directory."""

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Int

from ddiff._errors import RunDirectoryError
from ddiff._layers import gather_for_forward
from ddiff._sampler import AbstractSampler, Conditioning, SampleOutput, sample_keys
from ddiff._sharding import BATCH_AXES
from ddiff.runner.files import atomic_write_bytes, gibibytes
from ddiff.runner.images import image_grid, png_bytes
from ddiff.runner.mesh import (
    BATCH_SPEC,
    batch_shards,
    manual_axes,
    manual_specs,
    replicated,
    tree_specs,
)
from ddiff.runner.recipe import Recipe

SAMPLES_DIR = "samples"


def make_sample(sampler: AbstractSampler, *, seq_len: int, mesh: Mesh) -> Callable:
    """``(arrays, model, key, first, num_samples, conditioning) -> SampleOutput`` for the
    static parts of ``sampler`` (its arrays come in ``arrays``): samples ``first`` ..
    ``first + num_samples - 1`` of a sampling run, of ``seq_len`` positions (at most, for
    a variable-length sampler), split over the mesh's data x fsdp devices (tensor-parallel
    over ``model``, as the train step), with every sample's length
    (``seq_len`` unless the sampler stopped it). Sample
    i is drawn from ``fold_in(key, i)`` (:func:`ddiff.sample_keys`), each device passing
    the keys of its slice, so the samples depend neither on the mesh nor on how a run is
    cut into batches. ``first`` is traced: every batch of a run reuses one program."""

    @eqx.filter_jit
    def sample(
        arrays, model, key, first: Int[Array, ""], num_samples: int, conditioning: Conditioning
    ) -> SampleOutput:
        (sampler_arrays,) = arrays
        params, static = eqx.partition(model, eqx.is_array)
        specs = tree_specs(params, mesh)
        local_samples = num_samples // batch_shards(mesh)

        def local(sampler_arrays, params, conditioning):
            local_sampler = eqx.combine(sampler_arrays, sampler)
            full = eqx.combine(static, gather_for_forward(params, specs))
            start = first + jax.lax.axis_index(BATCH_AXES) * local_samples
            output = local_sampler.sample(
                full,
                keys=sample_keys(key, start, local_samples),
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
            in_specs=(replicated(sampler_arrays), manual_specs(specs), condition_specs),
            out_specs=SampleOutput(tokens=BATCH_SPEC, num_function_evals=P(), lengths=BATCH_SPEC),
            axis_names=manual_axes(mesh),
            check_vma=False,
        )(sampler_arrays, params, conditioning)

    return sample


GRID_IMAGES = 256
"""Samples of image data drawn into the PNG grid (the first ones)."""

REMOVALS = 3
"""Times a sample file is written again when ``samples/`` is removed under it."""


def _row_hashes(tokens: np.ndarray) -> np.ndarray:
    """A 64-bit FNV-1a hash of each row's token ids (distinct rows of the same sampling
    run collide with probability about N^2 / 2^65)."""
    hashes = np.full(tokens.shape[0], 0xCBF29CE484222325, np.uint64)
    with np.errstate(over="ignore"):
        for column in np.asarray(tokens, np.int64).T.astype(np.uint64):
            hashes = (hashes ^ column) * np.uint64(0x100000001B3)
    return hashes


def _full_lengths(tokens: np.ndarray, lengths: np.ndarray | None) -> np.ndarray:
    return np.full(len(tokens), tokens.shape[1]) if lengths is None else np.asarray(lengths)


class SampleStatistics:
    """Unigram entropy of sampled tokens (bits) and the fraction of distinct sequences,
    accumulated batch by batch (:meth:`add`) in memory independent of the sequences'
    length: token counts, and one 64-bit hash per sequence. Samples of a variable-length
    sampler count their first ``lengths[i]`` tokens (the rest is ``ddiff.PAD_TOKEN``),
    and their mean, least and greatest length are reported when some are shorter."""

    def __init__(self, vocab_size: int):
        self.counts = np.zeros(vocab_size + 1, np.int64)
        self.hashes: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        self.width = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray | None = None) -> None:
        tokens = np.asarray(tokens)
        lengths = _full_lengths(tokens, lengths)
        kept = tokens[np.arange(tokens.shape[1])[None, :] < lengths[:, None]]
        self.counts += np.bincount(kept, minlength=len(self.counts))[: len(self.counts)]
        self.hashes.append(_row_hashes(tokens))
        self.lengths.append(lengths)
        self.width = max(self.width, tokens.shape[1])

    def result(self) -> dict[str, float]:
        probs = self.counts / max(self.counts.sum(), 1)
        nonzero = probs[probs > 0]
        hashes = np.concatenate(self.hashes) if self.hashes else np.zeros(0, np.uint64)
        stats = {
            "unigram_entropy_bits": float(-(nonzero * np.log2(nonzero)).sum()),
            "distinct_fraction": len(np.unique(hashes)) / max(len(hashes), 1),
        }
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        if len(lengths) and (lengths < self.width).any():
            stats.update(
                mean_length=float(np.mean(lengths)),
                min_length=int(np.min(lengths)),
                max_length=int(np.max(lengths)),
            )
        return stats


def sample_statistics(
    tokens: np.ndarray, vocab_size: int, lengths: np.ndarray | None = None
) -> dict[str, float]:
    """Unigram entropy of the sampled tokens (bits), and the fraction of distinct sequences;
    with ``lengths`` (variable-length samples), over each sample's first ``lengths[i]``
    tokens, with their mean, least and greatest length."""
    statistics = SampleStatistics(vocab_size)
    statistics.add(tokens, lengths)
    return statistics.result()


class SampleWriter:
    """Writes samples under ``workdir/samples`` batch by batch (:meth:`add`), so that a
    sampling run of any size needs memory for one batch: ``name.txt`` (one sequence a
    line), ``name.npy`` (shape (N, D)) and ``name.json`` (unigram entropy, distinct
    fraction, network evaluations of the costliest batch, and ``conditioning``: label,
    guidance, ...); samples of image data also as a PNG grid of the first
    :data:`GRID_IMAGES`. Samples of a variable-length sampler (``seq_len``: their most
    positions) are written up to their length in the text, hold ``ddiff.PAD_TOKEN`` (-1)
    after it in the .npy, and list their ``lengths`` in the .json when some are shorter. Every file is written beside its place and renamed into it when
    complete (:meth:`close`): an interrupted run leaves no half-written file. Both are
    appended to batch by batch (nothing of the size of all samples is mapped or held),
    and a run whose .npy alone would not fit on the disk is refused before any file is
    made. A
    ``samples/`` folder removed meanwhile (its temporary files with it) is made again and
    the files written whole from what the writer holds open. Process 0 writes; the others
    only count."""

    def __init__(
        self,
        workdir: Path,
        recipe: Recipe,
        name: str,
        num_samples: int,
        *,
        conditioning: dict[str, Any] | None = None,
        seq_len: int | None = None,
    ):
        self.directory = Path(workdir) / SAMPLES_DIR
        self.recipe = recipe
        self.name = name
        self.num_samples = num_samples
        self.conditioning = conditioning
        self.written = 0
        self.num_function_evals = 0
        self.num_batches = 0
        self.statistics = SampleStatistics(recipe.data.vocab_size)
        self.seq_len = recipe.data.seq_len if seq_len is None else seq_len
        self.lengths: list[np.ndarray] = []
        self.grid: list[np.ndarray] = []
        self.writing = jax.process_index() == 0
        if not self.writing:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._check_space()
        tag = f".tmp-{os.getpid()}"
        self.temporary = {ext: self.directory / f".{name}{ext}{tag}" for ext in (".txt", ".npy")}
        self.text = open(self.temporary[".txt"], "w+", encoding="utf-8")  # noqa: SIM115
        self.array = open(self.temporary[".npy"], "w+b")  # noqa: SIM115
        header = {"descr": np.dtype("<i4").str, "fortran_order": False, "shape": (num_samples, self.seq_len)}
        np.lib.format.write_array_header_1_0(self.array, header)

    def _check_space(self) -> None:
        """Refuse samples whose .npy (N x D x 4 bytes) the disk under ``samples/`` cannot
        hold, before any file is made."""
        needed = self.num_samples * self.seq_len * 4
        free = shutil.disk_usage(self.directory).free
        if needed > free:
            raise RunDirectoryError(
                f"{self.num_samples} samples of {self.seq_len} tokens need {gibibytes(needed)} "
                f"for {self.name}.npy and {self.directory} has {gibibytes(free)} free; draw fewer "
                f"samples (--num) or free disk space"
            )

    @property
    def path(self) -> Path:
        """The text file's path (on every process)."""
        return self.directory / f"{self.name}.txt"

    def add(self, tokens: np.ndarray, num_function_evals: int, lengths: np.ndarray | None = None) -> None:
        """Append a batch of sampled sequences (host array of shape (n, D)) and, for a
        variable-length sampler, their lengths."""
        tokens = np.asarray(tokens)
        lengths = _full_lengths(tokens, lengths)
        self.num_batches += 1
        self.num_function_evals = max(self.num_function_evals, int(num_function_evals))
        if not self.writing:
            self.written += len(tokens)
            return
        self.statistics.add(tokens, lengths)
        self.lengths.append(lengths)
        self.array.write(np.ascontiguousarray(tokens, np.dtype("<i4")).tobytes())
        self.text.write(
            "".join(self.recipe.data.decode(row[:length]) + "\n" for row, length in zip(tokens, lengths, strict=True))
        )
        if self.recipe.data.image_shape is not None and self.written < GRID_IMAGES:
            self.grid.append(tokens[: GRID_IMAGES - self.written])
        self.written += len(tokens)

    def close(self) -> Path:
        """Check that every sample came, move the files into place, and write the stats.
        Returns the text file's path."""
        if self.written != self.num_samples:
            self.abort()
            raise RuntimeError(f"{self.written} samples written, {self.num_samples} expected")
        if not self.writing:
            return self.path
        self.text.flush()
        os.fsync(self.text.fileno())
        self.array.flush()
        os.fsync(self.array.fileno())
        self._place(".txt", self._text_bytes)
        self._place(".npy", self._array_bytes)
        self.text.close()
        self.array.close()
        stats: dict[str, Any] = dict(self.statistics.result())
        stats["num_function_evals"] = self.num_function_evals
        stats["num_samples"] = self.num_samples
        stats["num_batches"] = self.num_batches
        stats["sampler"] = self.recipe.names["sampler"]
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        if (lengths < self.seq_len).any():
            stats["lengths"] = [int(length) for length in lengths]
        if self.conditioning:
            stats["conditioning"] = self.conditioning
        self._write(".json", (json.dumps(stats, indent=2) + "\n").encode())
        if self.grid:
            self._write(".png", png_bytes(image_grid(np.concatenate(self.grid), self.recipe.data.image_shape)))
        return self.path

    def _text_bytes(self) -> bytes:
        self.text.seek(0)
        return self.text.read().encode()

    def _array_bytes(self) -> bytes:
        self.array.seek(0)
        return self.array.read()

    def _place(self, ext: str, content: Callable[[], bytes]) -> None:
        """Rename the temporary ``ext`` file into place; when ``samples/`` was removed
        since it was opened, write ``content()`` whole instead."""
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(self.temporary[ext], self.directory / f"{self.name}{ext}")
        except FileNotFoundError:
            self._write(ext, content())

    def _write(self, ext: str, data: bytes) -> None:
        """:func:`atomic_write_bytes` of ``name + ext`` into ``samples/``, made again (up to
        :data:`REMOVALS` times) if it is removed while the file is written."""
        for attempt in range(REMOVALS + 1):
            self.directory.mkdir(parents=True, exist_ok=True)
            try:
                atomic_write_bytes(self.directory / f"{self.name}{ext}", data)
                return
            except FileNotFoundError:
                if attempt == REMOVALS:
                    raise

    def abort(self) -> None:
        """Remove the temporary files (the earlier results stay as they were)."""
        if not self.writing:
            return
        self.text.close()
        self.array.close()
        for temporary in self.temporary.values():
            temporary.unlink(missing_ok=True)


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
    label, guidance, ...); samples of image data also as a PNG grid; variable-length
    samples as :class:`SampleWriter` writes them. Returns the text file's path (on every
    process; process 0 writes)."""
    tokens = np.asarray(output.tokens)
    lengths = None if output.lengths is None else np.asarray(output.lengths)
    writer = SampleWriter(
        workdir, recipe, name, len(tokens), conditioning=conditioning, seq_len=tokens.shape[1]
    )
    writer.add(tokens, int(output.num_function_evals), lengths)
    return writer.close()
