"""Sample quality, and sample quality against cost (``ddiff quality``).

The measures of a set of samples (:func:`sample_quality`), each reported beside what the
data give, so that no number is read alone:

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
"""

import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ddiff._builder import SectionBuilder
from ddiff._capabilities import check_compatibility
from ddiff._data import AbstractDataSource
from ddiff._errors import RecipeError, RunDirectoryError
from ddiff._model import DiffusionModel
from ddiff._registry import default_registry
from ddiff._sampler import Conditioning, SampleOutput
from ddiff.runner.files import atomic_write_text
from ddiff.runner.recipe import Recipe, parse_yaml

QUALITY_FILE = "quality.json"
QUALITY_PLOT = "quality.png"
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


def load_judge(path: str | Path, recipe: Recipe) -> Judge:
    """The latest checkpoint (EMA) of the run at ``path``, refused unless it was trained on
    data of the same vocabulary and length as ``recipe``'s."""
    from ddiff.runner.trainer.loop import load_run

    judge_recipe, state = load_run(path)
    asked = recipe.data.vocab_size, recipe.data.seq_len
    trained = judge_recipe.data.vocab_size, judge_recipe.data.seq_len
    if asked != trained:
        raise RunDirectoryError(
            f"judge {path} was trained on data with V={trained[0]}, D={trained[1]}, but the "
            f"samples have V={asked[0]}, D={asked[1]}; train a judge on the same data "
            f"(e.g. recipes/ar_quickstart.yaml for the quickstart)"
        )
    return Judge(recipe=judge_recipe, model=state.ema, path=str(path))


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


# --------------------------------------------------------------------------- quality vs cost


def parse_sampler(text: str) -> dict[str, Any]:
    """A ``--sampler`` argument: a registered name or a YAML mapping with ``kind``."""
    value = parse_yaml(text, "command line")
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, dict) or "kind" not in value:
        raise RecipeError(
            f"--sampler {text!r} must be a registered sampler name or a mapping such as "
            f"'{{kind: confidence, steps: 32}}'",
            source="command line",
        )
    return value


def parse_steps(text: str | None) -> tuple[int, ...]:
    """``--steps 16,32,64`` as a tuple of positive integers."""
    if text is None:
        return ()
    try:
        steps = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise RecipeError(f"--steps {text!r} is not a list of integers such as 16,32,64", source="command line") from None
    if not steps or min(steps) < 1:
        raise RecipeError(f"--steps needs positive integers, got {text!r}", source="command line")
    return steps


def sampler_variants(
    spec: Mapping[str, Any], steps: Sequence[int], recipe: Recipe, network: Any = None
) -> list[tuple[dict[str, Any], dict[str, Any], Any]]:
    """The samplers of one ``--sampler`` section: one per step count for a sampler with a
    ``steps`` argument (unless the section sets it), else the section alone; each as
    (section as given, resolved section, built sampler), checked against the run's
    components (its trained ``network`` too where given, so that a sampler the network
    cannot serve is refused before any sampling)."""
    builder = SectionBuilder(default_registry(), "command line")
    context = {
        "vocab_size": recipe.data.vocab_size,
        "seq_len": recipe.data.seq_len,
        "num_classes": recipe.data.num_classes,
    }
    cls = default_registry().get("sampler", spec["kind"]) if isinstance(spec.get("kind"), str) else None
    takes_steps = cls is not None and "steps" in getattr(cls, "__dataclass_fields__", {})
    sections = [dict(spec)]
    if takes_steps and "steps" not in spec and steps:
        sections = [{**spec, "steps": count} for count in steps]
    variants = []
    for section in sections:
        sampler, resolved, name = builder.component("sampler", section, "--sampler", context)
        components = {
            slot: (recipe.names[slot], getattr(recipe, slot)) for slot in ("process", "parameterization")
        }
        components["sampler"] = (name, sampler)
        components["schedule"] = (recipe.resolved["process"].get("schedule", {}).get("kind", "schedule"), recipe.process.schedule)
        if network is not None:
            components["network"] = (recipe.names["network"], network)
        check_compatibility(components, source="command line", deferred=("network",))
        variants.append((section, resolved, sampler))
    return variants


def _describe(section: Mapping[str, Any]) -> str:
    """A sampler section in one line: its kind, then its arguments (nested sections
    described the same way)."""

    def shown(value: Any) -> str:
        return _describe(value) if isinstance(value, Mapping) and "kind" in value else str(value)

    arguments = ", ".join(f"{k}={shown(v)}" for k, v in section.items() if k != "kind")
    return f"{section['kind']}({arguments})" if arguments else str(section["kind"])


def quality_sweep(
    recipe: Recipe,
    model: DiffusionModel,
    workdir: Path,
    specs: Sequence[Mapping[str, Any]],
    steps: Sequence[int],
    *,
    num_samples: int,
    seed: int,
    judge: Judge | None = None,
    start_from_prior: bool = False,
    report: Any = None,
) -> list[dict[str, Any]]:
    """Draw ``num_samples`` samples with every sampler of ``specs`` (at each of ``steps``
    where it takes steps) from ``model`` with the same key, and score them: one row per
    sampler with its network evaluations, its wall time (a second, compiled call; the
    first, with compilation, is ``first_call_seconds``) and :func:`score_samples`. Rows
    are passed to ``report`` as they finish."""
    from ddiff.runner.trainer.loop import Trainer

    variants = [variant for spec in specs for variant in sampler_variants(spec, steps, recipe, model.network)]
    conditioning = Conditioning(start_from_prior=start_from_prior)
    rows = []
    for given, resolved, sampler in variants:
        trainer = Trainer(dataclasses.replace(recipe, sampler=sampler), workdir, show_progress=False)
        key = sample_key(seed)
        began = time.perf_counter()
        output = trainer.sample(model, key=key, num_samples=num_samples, conditioning=conditioning)
        jax.block_until_ready(output.tokens)
        first = time.perf_counter() - began
        began = time.perf_counter()
        jax.block_until_ready(trainer.sample(model, key=key, num_samples=num_samples, conditioning=conditioning).tokens)
        wall = time.perf_counter() - began
        row = {
            "sampler": _describe(given),
            "given": given,
            "section": resolved,
            "wall_seconds": wall,
            "first_call_seconds": first,
            **score_samples(output, recipe, judge=judge, seed=seed),
        }
        rows.append(row)
        if report is not None:
            report(row)
    return rows


def primary_measure(rows: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """The measure a quality plot shows first: the exact NLL under the true source where
    known, else the judge's perplexity, else the unigram n-gram distance."""
    if rows and "nll_bits_per_token" in rows[0]:
        return "nll_bits_per_token", "NLL under the true source (bits/token)"
    if rows and "judge_perplexity" in rows[0]:
        return "judge_perplexity", "judge perplexity"
    return "ngram_tv_2", "bigram total variation to the data"


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a text table: sampler, evaluations, seconds, and the measures."""
    measures = [
        ("nll_bits_per_token", "nll b/t", "{:.4f}"),
        ("judge_perplexity", "judge ppl", "{:.3f}"),
        ("unigram_entropy_bits", "unigram H", "{:.4f}"),
        ("ngram_tv_1", "TV 1g", "{:.4f}"),
        ("ngram_tv_2", "TV 2g", "{:.4f}"),
        ("distinct_fraction", "distinct", "{:.3f}"),
    ]
    shown = [m for m in measures if any(m[0] in row for row in rows)]
    width = max([len("sampler")] + [len(row["sampler"]) for row in rows])
    header = f"{'sampler':<{width}}  {'NFE':>5}  {'seconds':>8}  " + "  ".join(f"{label:>9}" for _, label, _ in shown)
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = "  ".join(
            f"{fmt.format(row[key]) if key in row else '-':>9}" for key, _, fmt in shown
        )
        flag = "  collapsed" if row.get("entropy_collapse") else ""
        lines.append(f"{row['sampler']:<{width}}  {row['num_function_evals']:>5}  {row['wall_seconds']:>8.3f}  {cells}{flag}")
    if rows:
        reference = rows[0]
        notes = [f"data: unigram H {reference['data_unigram_entropy_bits']:.4f}"]
        for n in NGRAM_ORDERS:
            if f"data_ngram_tv_{n}" in reference:
                notes.append(f"TV {n}g between data halves {reference[f'data_ngram_tv_{n}']:.4f}")
        if "entropy_bits_per_token" in reference:
            notes.append(f"source entropy {reference['entropy_bits_per_token']:.4f} bits/token")
        lines.append("; ".join(notes))
    return "\n".join(lines)


def plot_quality(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Sample quality against network evaluations and against wall time, one line per
    sampler kind (its step counts joined), the data's value as a dashed line; and the
    unigram entropy below, beside the data's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = primary_measure(rows)
    figure, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        section = {k: v for k, v in row["given"].items() if k != "steps"}
        groups.setdefault(_describe(section), []).append(row)
    for column, (cost, cost_label) in enumerate((("num_function_evals", "network evaluations"), ("wall_seconds", "wall time (s)"))):
        for name, members in groups.items():
            members = sorted(members, key=lambda r: r[cost])
            for row_index, measure in enumerate((key, "unigram_entropy_bits")):
                axes[row_index, column].plot(
                    [r[cost] for r in members], [r.get(measure, float("nan")) for r in members], marker="o", label=name
                )
        references = (
            rows[0].get("entropy_bits_per_token") if key == "nll_bits_per_token" else None,
            rows[0]["data_unigram_entropy_bits"],
        )
        for row_index, (measure_label, reference) in enumerate(((label, references[0]), ("unigram entropy (bits)", references[1]))):
            target = axes[row_index, column]
            if reference is not None:
                target.axhline(reference, color="black", linestyle="--", lw=1.0, label="data")
            target.set(xlabel=cost_label, ylabel=measure_label)
            target.set_xscale("log")
            target.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=7, loc="best")
    figure.suptitle(title)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)
    return path


def write_quality(path: Path, rows: Sequence[Mapping[str, Any]], about: Mapping[str, Any]) -> Path:
    """The rows and what they were drawn from as JSON, written whole."""
    atomic_write_text(path, json.dumps({**about, "rows": list(rows)}, indent=2) + "\n")
    return path
