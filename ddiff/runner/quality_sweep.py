"""Sample quality against cost (``ddiff quality``): samples of several samplers drawn from
one model with the same keys, each scored by :mod:`ddiff.runner.quality` beside its
network evaluations and wall time, as a table, a JSON file and a plot; and the judges
that score samples by their likelihood under another run."""

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from ddiff._builder import SectionBuilder
from ddiff._capabilities import check_compatibility
from ddiff._errors import RunDirectoryError
from ddiff._model import DiffusionModel
from ddiff._registry import default_registry
from ddiff._sampler import Conditioning, SampleOutput
from ddiff.runner.files import atomic_write_text
from ddiff.runner.quality import NGRAM_ORDERS, Judge, sample_key, score_samples
from ddiff.runner.recipe import Recipe
from ddiff.runner.trainer.engine import Engine
from ddiff.runner.trainer.rundir import load_run

QUALITY_FILE = "quality.json"
QUALITY_PLOT = "quality.png"


def load_judge(path: str | Path, recipe: Recipe) -> Judge:
    """The latest checkpoint (EMA) of the run at ``path``, refused unless it was trained on
    data of the same vocabulary and length as ``recipe``'s."""
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


def sampler_variants(
    spec: Mapping[str, Any], steps: Sequence[int], recipe: Recipe, network: Any = None
) -> list[tuple[dict[str, Any], dict[str, Any], Any]]:
    """The samplers of one ``--sampler`` section: one per step count for a sampler with a
    ``steps`` argument (unless the section sets it), else the section alone; each as
    (section as given, resolved section, built sampler), checked against the run's
    components (its trained ``network`` too where given, so that a sampler the network
    cannot serve is refused before any sampling)."""
    builder = SectionBuilder(default_registry(), "command line")
    supplied = {
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
        sampler, resolved, name = builder.component("sampler", section, "--sampler", supplied)
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
    specs: Sequence[Mapping[str, Any]],
    steps: Sequence[int],
    *,
    num_samples: int,
    seed: int,
    judge: Judge | None = None,
    start_from_prior: bool = False,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Draw ``num_samples`` samples with every sampler of ``specs`` (at each of ``steps``
    where it takes steps) from ``model`` with the same key, and score them: one row per
    sampler with its network evaluations, its wall time (a second, compiled call; the
    first, with compilation, is ``first_call_seconds``) and
    :func:`~ddiff.runner.quality.score_samples`. Rows are passed to ``report`` as they
    finish."""
    variants = [variant for spec in specs for variant in sampler_variants(spec, steps, recipe, model.network)]
    engine = Engine(recipe)
    conditioning = Conditioning(start_from_prior=start_from_prior)

    def draw(sampler: Any) -> SampleOutput:
        output = engine.sample(
            model, key=sample_key(seed), num_samples=num_samples, conditioning=conditioning, sampler=sampler
        )
        jax.block_until_ready(output.tokens)
        return output

    rows = []
    for given, resolved, sampler in variants:
        began = time.perf_counter()
        output = draw(sampler)
        first = time.perf_counter() - began
        began = time.perf_counter()
        draw(sampler)
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
