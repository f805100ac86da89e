"""Sample quality: the measures of a set of samples (:func:`sample_quality`), each
reported beside what the data give, so that no number is read alone:

- on a source that knows its distribution (the synthetic ones), the exact negative
  log-likelihood per token of the samples under the true source, beside the source's
  entropy: samples drawn from the source score its entropy (within the standard error),
  worse samples score more, and collapsed samples (too likely: modes) score less;
- on every source, the unigram entropy of the samples beside that of the data (entropy
  collapse shows here first), and the total variation between the samples' n-gram
  distribution and the data's, beside the same distance between two halves of the data
  of the same size (the floor that finite samples leave);
- under a judge (another run on the same data, an autoregressive one for generative
  perplexity), the samples' bits per token and perplexity, beside the unigram entropy
  (the protocol of MDLM, BD3-LM and DUO).

A sampler is flagged (``entropy_collapse``) when its unigram entropy is more than 5% below
the data's, or when its samples are more likely under the true source than the source's
own samples are, by more than 4 standard errors.

Sample quality against cost, for several samplers (``ddiff quality``), is
:mod:`ddiff.runner.quality_sweep`.
"""

import dataclasses
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ddiff._data import AbstractDataSource
from ddiff._model import DiffusionModel
from ddiff._sampler import SampleOutput
from ddiff.runner.recipe import Recipe

NGRAM_ORDERS = (1, 2)
"""The n of the n-gram distances reported."""
COLLAPSE_RATIO = 0.95
"""Samples whose unigram entropy is below this fraction of the data's are flagged."""
COLLAPSE_Z = 4.0
"""Standard errors by which the samples' exact likelihood may exceed the source's before
they are flagged (a false alarm once in 30 000 sets of exact samples)."""


def unigram_entropy_bits(tokens: np.ndarray) -> float:
    """The entropy (bits) of the tokens' empirical unigram distribution."""
    _, counts = np.unique(np.asarray(tokens).reshape(-1), return_counts=True)
    probs = counts / counts.sum()
    return float(-(probs * np.log2(probs)).sum())


def ngram_tv(first: np.ndarray, second: np.ndarray, n: int) -> float:
    """Total variation between the empirical distributions of the n-grams (windows of n
    consecutive tokens within a sequence) of two sets of sequences."""
    windows = []
    for tokens in (first, second):
        view = np.lib.stride_tricks.sliding_window_view(np.asarray(tokens, np.int64), n, axis=1)
        windows.append(view.reshape(-1, n))
    both = np.concatenate(windows)
    _, inverse = np.unique(both, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    cells = int(inverse.max()) + 1
    split = len(windows[0])
    p = np.bincount(inverse[:split], minlength=cells) / split
    q = np.bincount(inverse[split:], minlength=cells) / (len(both) - split)
    return float(0.5 * np.abs(p - q).sum())


def reference_tokens(data: AbstractDataSource, count: int) -> np.ndarray:
    """The first ``count`` sequences of the data's eval split (all of it if shorter)."""
    split = data.split("eval")
    rows = [np.asarray(split[i]["tokens"]) for i in range(min(count, len(split)))]
    return np.stack(rows).astype(np.int64)


def sample_quality(
    tokens: np.ndarray,
    data: AbstractDataSource,
    reference: np.ndarray,
    *,
    labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """The quality measures of ``tokens`` (shape (N, D)) against the data (module doc).

    Arguments:
        tokens: the samples.
        data: their data source (for the exact log-likelihood and entropy, where known).
        reference: sequences of the data (its eval split) to compare with; the n-gram
            distances use min(N, len(reference) // 2) sequences of each side, and the
            data's own distance compares two disjoint halves of that size.
        labels: the samples' labels, for the exact likelihood of class-conditional data.

    Returns:
        ``unigram_entropy_bits`` and ``data_unigram_entropy_bits``; ``ngram_tv_{n}`` and
        ``data_ngram_tv_{n}``; with a known distribution ``nll_bits_per_token`` (and its
        standard error) and ``entropy_bits_per_token``; ``distinct_fraction``;
        ``entropy_collapse``.
    """
    tokens = np.asarray(tokens, np.int64)
    count, seq_len = tokens.shape
    result: dict[str, Any] = {
        "num_samples": int(count),
        "unigram_entropy_bits": unigram_entropy_bits(tokens),
        "data_unigram_entropy_bits": unigram_entropy_bits(reference),
        "distinct_fraction": len({row.tobytes() for row in tokens}) / count,
    }
    size = min(count, len(reference) // 2)
    if size >= 1:
        for n in NGRAM_ORDERS:
            if n <= seq_len:
                result[f"ngram_tv_{n}"] = ngram_tv(tokens[:size], reference[:size], n)
                result[f"data_ngram_tv_{n}"] = ngram_tv(reference[:size], reference[size : 2 * size], n)
    collapsed = result["unigram_entropy_bits"] < COLLAPSE_RATIO * result["data_unigram_entropy_bits"]
    log_p = data.log_prob(tokens, labels)
    if log_p is not None:
        bits = -np.asarray(log_p, np.float64) / (seq_len * math.log(2.0))
        stderr = float(bits.std(ddof=1) / math.sqrt(count)) if count > 1 else float("nan")
        result["nll_bits_per_token"] = float(bits.mean())
        result["nll_bits_per_token_stderr"] = stderr
        entropy = data.reference_stats().get("entropy_bits_per_token")
        if entropy is not None:
            result["entropy_bits_per_token"] = entropy
            if math.isfinite(result["nll_bits_per_token"]) and count > 1:
                collapsed = collapsed or result["nll_bits_per_token"] < entropy - COLLAPSE_Z * stderr
    result["entropy_collapse"] = bool(collapsed)
    return result


@eqx.filter_jit
def _judge_chunk(objective, model, tokens, key):
    return objective.per_example_terms(model, tokens, key=key, train=False).nelbo


def judge_nll(
    judge: Recipe, model: DiffusionModel, tokens: np.ndarray, *, seed: int = 0, chunk: int = 256
) -> np.ndarray:
    """The judge's negative log-likelihood (nats) of each sequence: its objective's
    ``nelbo``, exact for an autoregressive judge (``next_token_nll``) and a bound for
    others. Sequences go through in chunks of ``chunk`` (the last one padded)."""
    tokens = np.asarray(tokens, np.int32)
    width = min(chunk, len(tokens))
    parts = []
    key = jax.random.PRNGKey(seed)
    for start in range(0, len(tokens), width):
        part = tokens[start : start + width]
        padded = np.concatenate([part, np.repeat(part[-1:], width - len(part), axis=0)])
        values = _judge_chunk(judge.objective, model, jnp.asarray(padded), jax.random.fold_in(key, start))
        parts.append(np.asarray(values, np.float64)[: len(part)])
    return np.concatenate(parts)


def judge_report(nll: np.ndarray, seq_len: int, judge: str) -> dict[str, Any]:
    """The judge's bits per token (with its standard error over sequences) and perplexity
    exp(mean nats per token) of a set of samples."""
    nats = np.asarray(nll, np.float64) / seq_len
    stderr = float(nats.std(ddof=1) / math.sqrt(len(nats))) if len(nats) > 1 else float("nan")
    return {
        "judge": judge,
        "judge_bits_per_token": float(nats.mean() / math.log(2.0)),
        "judge_bits_per_token_stderr": stderr / math.log(2.0),
        "judge_perplexity": float(math.exp(nats.mean())),
    }


@dataclasses.dataclass(frozen=True)
class Judge:
    """A trained run that scores samples: its recipe, model and run directory."""

    recipe: Recipe
    model: DiffusionModel
    path: str


def score_samples(
    output: SampleOutput, recipe: Recipe, *, judge: Judge | None = None, seed: int = 0
) -> dict[str, Any]:
    """Every measure of ``output``'s samples (:func:`sample_quality`, and the judge's
    numbers when a judge is given), with the network evaluations they took."""
    tokens = np.asarray(output.tokens)
    reference = reference_tokens(recipe.data, 2 * len(tokens))
    result = {
        "num_function_evals": int(output.num_function_evals),
        **sample_quality(tokens, recipe.data, reference),
    }
    if judge is not None:
        nll = judge_nll(judge.recipe, judge.model, tokens, seed=seed)
        result.update(judge_report(nll, tokens.shape[1], judge.path))
    return result


def sample_key(seed: int) -> jax.Array:
    """The key of evaluation samples: fixed by the eval seed, so numbers are comparable
    across runs and samplers."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 0x5A3)
