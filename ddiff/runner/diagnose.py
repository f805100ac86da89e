"""Estimator variance: several objectives evaluated on the same network, the same data
batches and the same random keys (``ddiff diagnose``)."""

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ddiff._builder import build_component
from ddiff._capabilities import check_compatibility
from ddiff._errors import RecipeError
from ddiff._model import DiffusionModel
from ddiff._objective import AbstractObjective
from ddiff.runner.pipeline import eval_batches, validate_batch
from ddiff.runner.recipe import Recipe, parse_yaml


@dataclasses.dataclass(frozen=True)
class NamedObjective:
    """An objective built from a command-line spec, and the label it is reported under."""

    label: str
    name: str
    objective: AbstractObjective


def parse_objective(text: str, recipe: Recipe, *, source: str = "--objective") -> NamedObjective:
    """Build an objective from ``NAME`` or a YAML mapping ``{kind: NAME, key: value}``
    with the recipe's data sizes; it is reported under ``text`` as given."""
    spec = parse_yaml(text, source)
    if isinstance(spec, str):
        spec = {"kind": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
        raise RecipeError(
            f"{text!r} is neither an objective name nor a mapping with a 'kind'", source=source
        )
    data = recipe.data
    objective = build_component(
        "objective",
        spec,
        vocab_size=data.vocab_size,
        seq_len=data.seq_len,
        num_classes=data.num_classes,
        source=source,
    )
    return NamedObjective(label=text.strip(), name=spec["kind"], objective=objective)


def check_objectives(
    objectives: Sequence[NamedObjective], model: DiffusionModel, recipe: Recipe
) -> None:
    """One line naming the objective and the missing capability for an objective the
    model's process, parameterization, network or schedule cannot serve."""
    names = recipe.names
    for named in objectives:
        check_compatibility(
            {
                "objective": (named.name, named.objective),
                "process": (names["process"], model.process),
                "parameterization": (names["parameterization"], model.parameterization),
                "network": (names["network"], model.network),
                "schedule": (type(model.process.schedule).__name__, model.process.schedule),
            },
            source="--objective",
        )


@eqx.filter_jit
def _per_example(objective, model, tokens, labels, key):
    terms = objective.per_example_terms(model, tokens, key=key, labels=labels, train=False)
    return terms.nelbo, terms.metrics


def _std(values: np.ndarray) -> float | None:
    return float(np.std(values, ddof=1)) if values.size > 1 else None


def diagnose(
    model: DiffusionModel,
    recipe: Recipe,
    objectives: Sequence[NamedObjective],
    *,
    max_batches: int,
    repeats: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate every objective on the same eval batches (``eval.batch_size`` sequences
    each, at most ``max_batches``) with the same keys: batch b, repeat r uses
    fold_in(fold_in(PRNGKey(seed), b), r) for every objective, so objectives that draw
    their times and noise the same way see the same draws.

    Returns, per objective (in bits per token, nelbo / (D log 2)): ``mean`` and its
    ``stderr`` over sequences (each averaged over the repeats); ``per_example_std``, the
    spread of one-draw estimates over sequences and draws; ``per_batch_std``, the spread of
    one-draw batch means over full batches and repeats (what a training step's loss sees);
    with ``repeats`` >= 2, ``estimator_std``, the root mean over sequences of the variance
    across repeats (the Monte Carlo noise alone, without the data's spread); the means
    of the objective's named terms; and the paired ``difference`` to the first objective
    with its standard error.
    """
    if max_batches < 1 or repeats < 1:
        raise RecipeError("--batches and --repeats must be at least 1", source="command line")
    check_objectives(objectives, model, recipe)
    data = recipe.data
    scale = data.seq_len * math.log(2.0)
    base_key = jax.random.PRNGKey(seed)
    values = {named.label: [] for named in objectives}
    terms: dict[str, dict[str, list[float]]] = {named.label: {} for named in objectives}
    batch_means = {named.label: [] for named in objectives}
    seconds = dict.fromkeys(values, 0.0)
    batches = eval_batches(data, batch_size=recipe.eval.batch_size)
    for index, (batch, weights) in enumerate(batches):
        if index >= max_batches:
            break
        if index == 0:
            validate_batch(batch, data, "eval split")
        tokens = jnp.asarray(batch["tokens"])
        labels = jnp.asarray(batch["label"]) if "label" in batch else None
        keep = weights > 0
        for named in objectives:
            draws = []
            started = time.perf_counter()
            for repeat in range(repeats):
                key = jax.random.fold_in(jax.random.fold_in(base_key, index), repeat)
                nelbo, metrics = _per_example(named.objective, model, tokens, labels, key)
                nelbo = np.asarray(nelbo, np.float64)[keep] / scale
                draws.append(nelbo)
                if keep.all():
                    batch_means[named.label].append(float(nelbo.mean()))
                for metric, value in metrics.items():
                    value = np.broadcast_to(np.asarray(value, np.float64), keep.shape)[keep] / scale
                    terms[named.label].setdefault(metric, []).extend(value.tolist())
            seconds[named.label] += time.perf_counter() - started
            values[named.label].append(np.stack(draws, axis=1))
    results: dict[str, Any] = {}
    reference = None
    for named in objectives:
        draws = np.concatenate(values[named.label])  # (sequences, repeats)
        per_sequence = draws.mean(axis=1)
        count = len(per_sequence)
        entry: dict[str, Any] = {
            "objective": named.name,
            "mean": float(per_sequence.mean()),
            "stderr": float(per_sequence.std(ddof=1) / math.sqrt(count)) if count > 1 else None,
            "per_example_std": _std(draws.ravel()),
            "per_batch_std": _std(np.asarray(batch_means[named.label])),
            "estimator_std": (
                float(np.sqrt(np.mean(np.var(draws, axis=1, ddof=1)))) if repeats > 1 else None
            ),
            "terms": {metric: float(np.mean(v)) for metric, v in terms[named.label].items()},
            "seconds": seconds[named.label],
        }
        if reference is None:
            reference = (named.label, per_sequence)
        else:
            difference = per_sequence - reference[1]
            entry["difference"] = {
                "to": reference[0],
                "mean": float(difference.mean()),
                "stderr": float(difference.std(ddof=1) / math.sqrt(count)) if count > 1 else None,
            }
        results[named.label] = entry
    return {
        "unit": "bits_per_token",
        "num_sequences": int(len(np.concatenate(values[objectives[0].label]))),
        "num_batches": len(values[objectives[0].label]),
        "batch_size": recipe.eval.batch_size,
        "repeats": repeats,
        "seed": seed,
        "objectives": results,
    }


def _number(value: float | None, width: int = 10) -> str:
    return f"{value:>{width}.4f}" if value is not None else f"{'-':>{width}}"


def format_diagnosis(result: Mapping[str, Any]) -> str:
    """The table that ``ddiff diagnose`` prints."""
    objectives = result["objectives"]
    width = max(12, *(len(label) for label in objectives))
    lines = [
        f"{result['num_sequences']} sequences in {result['num_batches']} batches of "
        f"{result['batch_size']}, {result['repeats']} draw(s) each; bits per token",
        f"{'objective':<{width}} {'mean':>10} {'stderr':>10} {'batch std':>10} "
        f"{'example std':>11} {'estim. std':>10}",
    ]
    for label, entry in objectives.items():
        lines.append(
            f"{label:<{width}} {_number(entry['mean'])} {_number(entry['stderr'])} "
            f"{_number(entry['per_batch_std'])} {_number(entry['per_example_std'], 11)} "
            f"{_number(entry['estimator_std'])}"
        )
    for label, entry in objectives.items():
        if "difference" in entry:
            difference = entry["difference"]
            error = difference["stderr"]
            lines.append(
                f"{label} - {difference['to']}: {difference['mean']:+.4f}"
                + (f" ± {error:.4f}" if error is not None else "")
                + " bits per token (paired)"
            )
    return "\n".join(lines)
