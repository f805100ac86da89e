"""The conformance checks of a sampler: (d) against the data, (h) against its own chain.

(d) ``check_chain_limit`` computes the law of the chain a sampler declares under the
exact denoiser and compares it with the data (deterministic); ``check_sampler`` samples
a sampler without a declared chain, driven by the oracle. (h) ``check_reverse_chain``
tests a sampler's samples with any model against the exact law of its chain
(:func:`ddiff.testing.chain_law`). All the kit's draws go through one call, ``_sample``.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from ddiff._errors import DdiffError
from ddiff._model import DiffusionModel
from ddiff._process import AbstractForwardProcess
from ddiff._sampler import AbstractSampler, Conditioning, ReverseChain, sample_keys
from ddiff.testing._chains import Combos, chain_law, exact_target
from ddiff.testing._predictions import exact_predictions, model_predictions, tweedie_problem
from ddiff.testing._results import CheckResult, _describe, _show, chi_square_test
from ddiff.testing._toy import ToyDistribution


@eqx.filter_jit
def _sample(sampler, model, key, conditioning, num_samples, seq_len):
    return sampler.sample(
        model, keys=sample_keys(key, 0, num_samples), seq_len=seq_len, conditioning=conditioning
    )


def sampling_conditioning(
    distribution: ToyDistribution,
    kind: str,
    *,
    key: jax.Array,
    num_samples: int,
    fixed_fraction: float = 0.5,
) -> tuple[Conditioning, jax.Array | None, Int[Array, "n seq"] | None, Bool[Array, "n seq"] | None]:
    """The conditioning of a sampler check, and what the output must be compared with.

    ``none``: unconditional. ``labels``: labels drawn from p(c) (class-conditional toy).
    ``infill``: each position of each sample is given with probability ``fixed_fraction``,
    its value taken from a draw x ~ p; the complete output is then distributed as p.
    ``labels+infill``: both, the given values drawn from p(x | c) for the sample's label c;
    the output's joint distribution with the labels is then p(c) p(x | c).
    """
    if kind == "none":
        return Conditioning(), None, None, None
    data, labels = distribution.sample(key, num_samples)
    if kind == "labels":
        if labels is None:
            raise ValueError("conditioning 'labels' needs a class-conditional toy distribution")
        return Conditioning(labels=labels), labels, None, None
    if kind in ("infill", "labels+infill"):
        if kind == "infill":
            labels = None
        elif labels is None:
            raise ValueError("conditioning 'labels+infill' needs a class-conditional toy distribution")
        mask = jax.random.bernoulli(jax.random.fold_in(key, 1), fixed_fraction, data.shape)
        return Conditioning(labels=labels, fixed_tokens=data, fixed_mask=mask), labels, data, mask
    raise ValueError(
        f"unknown conditioning {kind!r}; use 'none', 'labels', 'infill' or 'labels+infill'"
    )


def check_sampler(
    sampler: AbstractSampler,
    model: DiffusionModel,
    distribution: ToyDistribution,
    *,
    key: jax.Array,
    conditioning: str = "none",
    num_samples: int = 2**14,
    alpha: float = 1e-3,
    subject: str | None = None,
) -> CheckResult:
    """(d) A sampler driven by the oracle reproduces p.

    Draws ``num_samples`` sequences (unconditionally, given labels drawn from p(c), or
    with about half of the positions given from a draw of p: see
    :func:`sampling_conditioning`) and tests the counts of each (label,) sequence against
    the exact probabilities with Pearson's chi-square test at false-alarm rate ``alpha``
    (:func:`chi_square_test`; with labels, expected counts are n_c p(x | c) for the
    observed label counts n_c). It also fails on any sample of probability 0, on a given
    position that changed, on a mask left in the output, or on a non-positive count of
    network evaluations. Samplers that take steps are exact only as steps grow: give
    enough steps that their error is below the test's resolution.
    """
    condition_key, sample_key = jax.random.split(key)
    seq_len = distribution.seq_len
    spec, labels, _, _ = sampling_conditioning(
        distribution, conditioning, key=condition_key, num_samples=num_samples
    )
    output = _sample(sampler, model, sample_key, spec, num_samples, seq_len)
    tokens = np.asarray(output.tokens)
    evals = int(output.num_function_evals)
    problems = _output_problems(tokens, distribution.vocab_size, spec, evals, num_samples, seq_len)
    tokens = np.clip(tokens, 0, distribution.vocab_size - 1)
    powers = distribution.vocab_size ** np.arange(seq_len - 1, -1, -1)
    index = tokens @ powers
    count = distribution.num_sequences
    if labels is None:
        observed = np.bincount(index, minlength=count)
        probabilities = distribution.probabilities()
        constraints = 1
    else:
        label_values = np.asarray(labels)
        observed = np.bincount(label_values * count + index, minlength=distribution.num_classes * count)
        label_counts = np.bincount(label_values, minlength=distribution.num_classes)
        probabilities = np.concatenate(
            [label_counts[c] / num_samples * distribution.probabilities(c) for c in range(distribution.num_classes)]
        )
        constraints = int((label_counts > 0).sum())
    test = chi_square_test(observed, probabilities, constraints=constraints)
    if test["impossible"]:
        problems.append(f"{int(test['impossible'])} samples of probability 0")
    passed = not problems and test["p_value"] >= alpha
    summary = (
        f"chi2 = {test['chi2']:.1f} on {int(test['dof'])} dof, p = {test['p_value']:.3g} "
        f"(fails below {alpha:g}, the false-alarm rate), TV = {test['tv']:.4f} over "
        f"{num_samples} samples ({conditioning} conditioning), {evals} network evaluations"
        + (f"; {'; '.join(problems)}" if problems else "")
    )
    numbers = {**test, "num_function_evals": float(evals), "alpha": alpha}
    return CheckResult(
        "sampler_exact",
        subject or f"{_describe(sampler)} on a toy",
        bool(passed),
        summary,
        numbers,
    )


def conditioning_patterns(
    distribution: ToyDistribution,
    kind: str,
    *,
    key: jax.Array,
    num_samples: int,
    patterns: int = 4,
    guidance: float = 0.0,
) -> tuple[Conditioning, Combos, np.ndarray]:
    """The conditioning of a chain check: ``none``, ``labels`` (labels drawn from p(c)),
    ``infill`` or ``labels+infill`` (each sample also gets one of ``patterns`` infilling
    patterns, uniformly: a set of given positions, each position given with probability
    1/2 but never all, and their values from one draw of p). With ``guidance`` w > 0 and
    labels, classifier-free guidance of weight w.

    Returns:
        the sampler's :class:`ddiff.Conditioning`, the distinct combinations (label,
        pattern) in a :class:`Combos`, and each sample's combination index.
    """
    rng = _numpy_rng(key)
    seq_len = distribution.seq_len
    labelled = kind in ("labels", "labels+infill")
    infill = kind in ("infill", "labels+infill")
    if kind not in ("none", "labels", "infill", "labels+infill"):
        raise ValueError(
            f"unknown conditioning {kind!r}; use 'none', 'labels', 'infill' or 'labels+infill'"
        )
    if labelled and distribution.num_classes == 0:
        raise ValueError(f"conditioning {kind!r} needs a class-conditional toy distribution")
    count = patterns if infill else 1
    masks = np.zeros((count, seq_len), bool)
    values = np.zeros((count, seq_len), np.int64)
    if infill:
        sequences = np.asarray(distribution.sequences())
        marginal = distribution.probabilities()
        for index in range(count):
            mask = rng.random(seq_len) < 0.5
            while mask.all():
                mask = rng.random(seq_len) < 0.5
            masks[index] = mask
            values[index] = np.where(mask, sequences[rng.choice(len(sequences), p=marginal)], 0)
    classes = distribution.num_classes if labelled else 1
    if labelled:
        class_probs = np.exp(np.asarray(distribution.class_log_probs, np.float64))
        labels = rng.choice(classes, size=num_samples, p=class_probs / class_probs.sum())
    else:
        labels = np.zeros(num_samples, np.int64)
    pattern = rng.integers(0, count, num_samples)
    combo = labels * count + pattern
    combos = Combos(
        labels=np.repeat(np.arange(classes), count) if labelled else None,
        fixed_mask=np.tile(masks, (classes, 1)),
        fixed_tokens=np.tile(values, (classes, 1)),
    )
    spec = Conditioning(
        labels=jnp.asarray(labels, jnp.int32) if labelled else None,
        fixed_tokens=jnp.asarray(values[pattern], jnp.int32) if infill else None,
        fixed_mask=jnp.asarray(masks[pattern]) if infill else None,
        guidance=float(guidance) if labelled else 0.0,
    )
    return spec, combos, combo


def _numpy_rng(key: jax.Array) -> np.random.Generator:
    """A numpy generator seeded by a JAX key (legacy uint32 or typed)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key, np.uint32).ravel())


def _describe_combo(combos: Combos, index: int) -> str:
    parts = []
    if combos.labels is not None:
        parts.append(f"label {int(combos.labels[index])}")
    mask = combos.fixed_mask[index]
    if mask.any():
        given = "".join(str(int(v)) if m else "_" for v, m in zip(combos.fixed_tokens[index], mask, strict=True))
        parts.append(f"given {given}")
    return f" [{', '.join(parts)}]" if parts else ""


def _sequence_of(index: int, vocab_size: int, seq_len: int) -> tuple[int, ...]:
    return tuple(int(d) for d in np.unravel_index(index, (vocab_size,) * seq_len))


def check_reverse_chain(
    sampler: AbstractSampler,
    model: DiffusionModel,
    distribution: ToyDistribution,
    *,
    key: jax.Array,
    conditioning: str = "none",
    guidance: float = 0.0,
    patterns: int = 4,
    num_samples: int = 2**13,
    alpha: float = 1e-3,
    chain: ReverseChain | None = None,
    subject: str | None = None,
) -> CheckResult:
    """(h) A sampler draws from the exact law of the chain it declares
    (:meth:`ddiff.AbstractSampler.reverse_chain`), for any model.

    ``num_samples`` sequences are drawn with the conditioning of
    :func:`conditioning_patterns` (labels from p(c), infilling patterns, guidance), and the
    counts of each (conditioning, output sequence) are tested with Pearson's chi-square
    test at false-alarm rate ``alpha`` against the chain's law, which
    :func:`ddiff.testing.chain_law` computes in float64 by pushing the distribution over
    every noisy sequence through the chain's steps with the model's predictions, without
    running the sampler's code. With a model whose predictions depend on t
    (:func:`ddiff.testing.table_model`) a wrong reverse probability, a wrong time grid, a
    wrong first-hitting time law, a wrong score conversion or wrong guidance changes the
    law. An output with a noisy position left, a changed given position or a sequence of
    probability 0 fails too; ``distribution`` supplies p(c) and the given values. For a
    chain whose final draw is the process's Tweedie denoiser, that denoiser must invert
    the concentration ratios of the exact means of ``distribution`` at the final time and
    at t = 0.25, 0.5, 0.75 (:func:`ddiff.testing.tweedie_problem`), the only process code the reference trusts
    besides marginals, transitions and prior.
    """
    chain = sampler.reverse_chain() if chain is None else chain
    if chain is None:
        raise DdiffError(
            f"{_describe(sampler)} declares no reverse chain (reverse_chain() is None); use "
            f"check_sampler"
        )
    seq_len, vocab = distribution.seq_len, distribution.vocab_size
    condition_key, sample_key = jax.random.split(key)
    spec, combos, combo = conditioning_patterns(
        distribution, conditioning, key=condition_key, num_samples=num_samples,
        patterns=patterns, guidance=guidance,
    )
    law, noisy = chain_law(
        chain, model.process, model_predictions(model), seq_len=seq_len, combos=combos,
        guidance=spec.guidance,
    )
    output = _sample(sampler, model, sample_key, spec, num_samples, seq_len)
    tokens = np.asarray(output.tokens)
    problems = _output_problems(tokens, vocab, spec, int(output.num_function_evals), num_samples, seq_len)
    tokens = np.clip(tokens, 0, vocab - 1)
    index = tokens @ (vocab ** np.arange(seq_len - 1, -1, -1))
    cells = vocab**seq_len
    observed = np.bincount(combo * cells + index, minlength=combos.count * cells).reshape(combos.count, cells)
    per_combo = observed.sum(1)
    expected = per_combo[:, None] * law
    test = chi_square_test(observed, law * (per_combo[:, None] / num_samples), constraints=int((per_combo > 0).sum()))
    if test["impossible"]:
        problems.append(f"{int(test['impossible'])} samples of probability 0 under the chain")
    if float(noisy.max()) > 1e-9:
        problems.append(f"the chain itself leaves a noisy position with probability {float(noisy.max()):.2e}")
    if chain.final == "tweedie":
        problem = tweedie_problem(model.process, distribution, (chain.times[-1], 0.25, 0.5, 0.75))
        if problem:
            problems.append(problem)
    passed = not problems and test["p_value"] >= alpha
    worst = _worst_cells(observed, expected, law, combos, vocab, seq_len)
    summary = (
        f"chi2 = {test['chi2']:.1f} on {int(test['dof'])} dof, p = {test['p_value']:.3g} (fails "
        f"below {alpha:g}, the false-alarm rate), TV = {test['tv']:.4f} over {num_samples} "
        f"samples against the exact law of its chain ({chain.step}, {len(chain.times) - 1} "
        f"steps; {conditioning} conditioning"
        + (f", guidance {spec.guidance:g}" if spec.guidance else "")
        + f"), {int(output.num_function_evals)} network evaluations"
        + (f"; {'; '.join(problems)}" if problems else "")
        + f"; largest deviations: {worst}"
    )
    numbers = {**test, "alpha": alpha, "num_function_evals": float(output.num_function_evals)}
    return CheckResult(
        "reverse_chain", subject or f"{_describe(sampler)} on a toy", bool(passed), summary, numbers
    )


def _output_problems(tokens, vocab, spec, evals, num_samples, seq_len) -> list[str]:
    problems = []
    if tokens.shape != (num_samples, seq_len):
        problems.append(f"output shape {tokens.shape}, expected {(num_samples, seq_len)}")
    if tokens.min() < 0 or tokens.max() >= vocab:
        problems.append(f"tokens outside 0..{vocab - 1} (a mask left?)")
    if spec.fixed_mask is not None:
        changed = int(np.sum(np.asarray(spec.fixed_mask) & (tokens != np.asarray(spec.fixed_tokens))))
        if changed:
            problems.append(f"{changed} given positions changed")
    if evals <= 0:
        problems.append(f"reported {evals} network evaluations")
    return problems


def _worst_cells(observed, expected, law, combos, vocab, seq_len, count: int = 3) -> str:
    with np.errstate(divide="ignore", invalid="ignore"):
        residual = np.where(expected > 0, (observed - expected) / np.sqrt(np.where(expected > 0, expected, 1.0)), np.where(observed > 0, np.inf, 0.0))
    order = np.argsort(-np.abs(residual), axis=None)[:count]
    rows = []
    for flat in order:
        combo, cell = np.unravel_index(flat, observed.shape)
        rows.append(
            f"output {_show(_sequence_of(cell, vocab, seq_len))}{_describe_combo(combos, combo)}: "
            f"{int(observed[combo, cell])} samples vs {expected[combo, cell]:.1f} expected "
            f"(exact probability {law[combo, cell]:.4f})"
        )
    return "; ".join(rows)


def check_chain_limit(
    chain: ReverseChain,
    process: AbstractForwardProcess,
    distribution: ToyDistribution,
    *,
    key: jax.Array,
    conditioning: str = "none",
    patterns: int = 4,
    tolerance: float = 0.02,
    subject: str | None = None,
) -> CheckResult:
    """(d) The chain a sampler declares reproduces the data when driven by the exact
    denoiser: its output law, computed exactly (:func:`ddiff.testing.chain_law` with the
    exact posterior means of ``distribution`` at every noisy sequence), is within total
    variation ``tolerance`` of p(x | c, given values) for every conditioning of
    :func:`conditioning_patterns`. Deterministic (no sampling, no false alarms): it bounds
    the chain's own discretisation error, so give a sampler enough steps; together with
    :func:`check_reverse_chain` (the sampler draws from its chain for any model) it says
    that the sampler reproduces the data."""
    spec, combos, _ = conditioning_patterns(
        distribution, conditioning, key=key, num_samples=1, patterns=patterns
    )
    del spec
    law, noisy = chain_law(
        chain, process, exact_predictions(distribution), seq_len=distribution.seq_len, combos=combos
    )
    target = exact_target(distribution, combos)
    distances = 0.5 * np.abs(law - target).sum(1)
    worst = int(np.argmax(distances))
    cell = int(np.argmax(np.abs(law[worst] - target[worst])))
    passed = bool(distances.max() <= tolerance and noisy.max() <= 1e-9 and np.all(np.isfinite(law)))
    shape = (distribution.vocab_size,) * distribution.seq_len
    summary = (
        f"TV between the exact law of its chain ({chain.step}, {len(chain.times) - 1} steps) "
        f"under the exact denoiser and p = {distances.max():.5f} (largest over "
        f"{combos.count} conditioning{'s' if combos.count > 1 else ''}: {conditioning}), "
        f"allowed {tolerance:g}; largest difference at output "
        f"{_show(np.unravel_index(cell, shape))}{_describe_combo(combos, worst)}: "
        f"{law[worst, cell]:.5f} vs p = {target[worst, cell]:.5f}"
        + (f"; a noisy position left with probability {noisy.max():.2e}" if noisy.max() > 1e-9 else "")
    )
    numbers = {"tv": float(distances.max()), "tolerance": tolerance, "noisy": float(noisy.max())}
    return CheckResult(
        "chain_limit", subject or f"{chain.step} chain on a toy", passed, summary, numbers
    )
