"""The grain pipeline that batches a data source deterministically, and the units
evaluation reports."""

import math
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np

from ddiff._data import METRICS, AbstractDataSource, RandomAccess
from ddiff._errors import DataError


def _checked_split(source: AbstractDataSource, name: str) -> RandomAccess:
    split = source.split(name)
    if len(split) == 0:
        raise DataError(f"the {name!r} split of {type(source).__name__} is empty; check its files")
    return split


def train_batches(
    source: AbstractDataSource,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """An endless, shuffled (reshuffled each epoch), checkpointable iterator of this
    process's part of each global batch.

    Global batch k is rows [kB, (k+1)B) of the shuffled, repeated split, B being
    ``batch_size * process_count``; process p reads only its ``batch_size`` consecutive
    rows of it. So the global batches do not depend on the number of processes.
    ``get_state()``/``set_state()`` capture exactly where the iterator is, so a resumed
    run sees the same batches.
    """
    dataset = grain.MapDataset.source(_checked_split(source, "train"))
    if len(dataset) < batch_size * process_count:
        raise DataError(
            f"the train split has {len(dataset)} examples, fewer than one global batch "
            f"({batch_size * process_count}); lower trainer.batch_size"
        )
    dataset = dataset.shuffle(seed=seed).repeat(None).batch(batch_size, drop_remainder=True)
    return iter(dataset[process_index::process_count].to_iter_dataset())


def eval_batches(
    source: AbstractDataSource,
    *,
    batch_size: int,
    max_examples: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """One pass over the eval split in order, in global batches of ``batch_size``: this
    process's consecutive rows of each, and the weights of the whole global batch. The
    last batch is padded by repeating the final example, with weight 0 on the padding."""
    split = _checked_split(source, "eval")
    count = len(split) if max_examples is None else min(len(split), max_examples)
    local = batch_size // process_count
    for start in range(0, count, batch_size):
        rows = np.minimum(np.arange(start, start + batch_size), count - 1)
        weights = (np.arange(start, start + batch_size) < count).astype(np.float32)
        mine = rows[process_index * local : (process_index + 1) * local]
        items = [split[int(i)] for i in mine]
        batch = {key: np.stack([item[key] for item in items]) for key in items[0]}
        yield batch, weights


def metric_report(metric: str, bits_per_token: float, stderr: float) -> dict[str, float]:
    """``metric`` and its standard error from bits per token and its standard error.

    Bits per dimension and per character equal bits per token when each token is one
    dimension or one character. Perplexity is 2 ** bits_per_token (the exponential of the
    mean negative log-likelihood per token in nats); its standard error follows by the
    delta method.
    """
    if metric not in METRICS:
        raise DataError(f"unknown evaluation metric {metric!r}; known: {', '.join(METRICS)}")
    if metric == "bits_per_token":
        return {}
    if metric == "perplexity":
        perplexity = 2.0**bits_per_token
        return {"perplexity": perplexity, "perplexity_stderr": perplexity * math.log(2.0) * stderr}
    return {metric: bits_per_token, f"{metric}_stderr": stderr}


def validate_batch(batch: Mapping[str, Any], source: AbstractDataSource, where: str) -> None:
    """Refuse tokens outside the vocabulary or of the wrong length, naming ``where``."""
    tokens = batch["tokens"]
    if tokens.shape[-1] != source.seq_len:
        raise DataError(
            f"{where}: examples have {tokens.shape[-1]} tokens, the source declares "
            f"seq_len={source.seq_len}"
        )
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= source.vocab_size:
        raise DataError(
            f"{where}: token id {high if high >= source.vocab_size else low} is outside "
            f"the vocabulary 0..{source.vocab_size - 1}"
        )
