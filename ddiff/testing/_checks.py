"""The conformance checks: objectives and samplers against exact answers on toy data.

Every check returns a :class:`CheckResult` with the numbers it compared, the sample size
and the tolerance; :meth:`CheckResult.raise_if_failed` turns a failure into a
:class:`ConformanceError` (an ``AssertionError``, so pytest reports it as a failure).

Monte Carlo tolerances are z standard errors of the estimated mean (z = 4 by default:
a two-sided false-alarm probability of 6.3e-5 per comparison, for errors that are close
to normal at these sample sizes). Standard errors treat examples as independent; the
antithetic times objectives use only lower the true error, so the tests are conservative.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from ddiff._errors import DdiffError
from ddiff._model import DiffusionModel
from ddiff._objective import AbstractObjective
from ddiff._process import AbstractForwardProcess
from ddiff._sampler import AbstractSampler, Conditioning, ReverseChain, sample_keys
from ddiff._schedule import AbstractSchedule
from ddiff.testing._exact import prior_gap
from ddiff.testing._reference import (
    Combos,
    _float64,
    chain_law,
    exact_bound_terms,
    exact_predictions,
    exact_target,
    model_predictions,
    tweedie_problem,
)
from ddiff.testing._toy import ToyDistribution


class ConformanceError(AssertionError):
    """A component that fails a conformance check; the message holds the numbers."""


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """The outcome of one check.

    Attributes:
        check: the check's name (``tight``, ``discrete_bound``, ``entropy_bound``,
            ``schedule_invariance``, ``sampler_exact``).
        subject: what was checked (e.g. ``objective 'md4_elbo' on toy 'markov'``).
        passed: whether it passed.
        summary: one line with the comparison made, the sample size and the tolerance.
        numbers: the quantities computed, by name.
    """

    check: str
    subject: str
    passed: bool
    summary: str
    numbers: Mapping[str, float]

    def __str__(self) -> str:
        status = "passed" if self.passed else "FAILED"
        return f"{self.check} {status} for {self.subject}: {self.summary}"

    def raise_if_failed(self) -> "CheckResult":
        if not self.passed:
            raise ConformanceError(str(self))
        return self


def normal_false_alarm(z: float) -> float:
    """Two-sided false-alarm probability of a |Z| > z test for a standard normal Z."""
    return math.erfc(z / math.sqrt(2.0))


@eqx.filter_jit
def _per_example_terms(objective, model, x0, labels, key):
    terms = objective.per_example_terms(model, x0, key=key, labels=labels, train=False)
    reconstruction = terms.metrics.get("reconstruction", jnp.zeros_like(terms.nelbo))
    return terms.nelbo, jnp.broadcast_to(reconstruction, terms.nelbo.shape)


@eqx.filter_jit
def _log_probs(distribution, x0, labels):
    if labels is None:
        return jax.vmap(distribution.log_prob)(x0)
    return jax.vmap(distribution.log_prob)(x0, labels)


def _data(distribution: ToyDistribution, key, num: int):
    x0, labels = distribution.sample(key, num)
    return x0, labels, np.asarray(_log_probs(distribution, x0, labels), np.float64)


def _mean_and_error(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def _describe(component: object) -> str:
    return type(component).__name__


def check_tight(
    objective: AbstractObjective,
    model: DiffusionModel,
    distribution: ToyDistribution,
    *,
    key: jax.Array,
    num_examples: int = 2**15,
    z: float = 4.0,
    subject: str | None = None,
) -> CheckResult:
    """(a) A continuous-time objective evaluated with the oracle is tight.

    With the exact denoiser, E_x[nelbo(x)] = H(p) + KL(q_1 || p_1) + r, where the prior
    mismatch KL(q_1 || p_1) is computed exactly by :func:`prior_gap` and the
    reconstruction slack r = E[KL(q(x | x_0-noised) || decoder)] lies between 0 and the
    objective's reported ``reconstruction`` term. Per example the gap
    nelbo(x) + log p(x) is averaged over ``num_examples`` draws x ~ p (one antithetic time
    each); the check passes when its mean lies in
    [prior_gap - z se, prior_gap + reconstruction + z se].
    """
    data_key, objective_key = jax.random.split(key)
    x0, labels, log_p = _data(distribution, data_key, num_examples)
    nelbo, reconstruction = _per_example_terms(objective, model, x0, labels, objective_key)
    gap, error = _mean_and_error(np.asarray(nelbo, np.float64) + log_p)
    mismatch = prior_gap(distribution, model.process)
    slack = float(np.mean(np.asarray(reconstruction, np.float64)))
    low, high = mismatch - z * error, mismatch + slack + z * error
    passed = bool(np.isfinite(gap) and low <= gap <= high)
    numbers = {
        "mean_nelbo": float(np.mean(nelbo)),
        "entropy": distribution.conditional_entropy(),
        "gap": gap,
        "standard_error": error,
        "prior_gap": mismatch,
        "reconstruction_allowance": slack,
        "num_examples": num_examples,
        "z": z,
    }
    summary = (
        f"E[nelbo] - H(p) = {gap:.5f} ± {error:.5f} nats over {num_examples} examples, "
        f"allowed [{low:.5f}, {high:.5f}] (prior gap {mismatch:.2e} + reconstruction "
        f"allowance {slack:.2e} ± {z} se; false alarm {normal_false_alarm(z):.1e}); "
        f"E[nelbo] = {numbers['mean_nelbo']:.4f}, H(p) = {numbers['entropy']:.4f}"
    )
    return CheckResult(
        "tight", subject or f"{_describe(objective)} on a toy", passed, summary, numbers
    )


def check_discrete_bound(
    make_objective: Callable[[int], AbstractObjective],
    model: DiffusionModel,
    distribution: ToyDistribution,
    *,
    key: jax.Array,
    steps: Sequence[int] = (1, 2, 4, 16, 64),
    num_examples: int = 2**15,
    z: float = 4.0,
    subject: str | None = None,
) -> CheckResult:
    """(b) A discrete-time objective with the oracle is an upper bound whose gap shrinks as
    T grows.

    For each T in ``steps`` (increasing), the gap g_T = E_x[nelbo_T(x)] - H(p) is
    estimated from ``num_examples`` draws. Passes when every g_T >= -z se_T (a bound),
    every g_T - g_T' >= -z se (T < T' consecutive: non-increasing within error) and
    g_first - g_last > z se (it shrinks), with se the standard error of each difference.
    A distribution with dependence between positions is needed for the last condition.
    """
    steps = sorted(steps)
    gaps, errors = [], []
    for index, count in enumerate(steps):
        data_key, objective_key = jax.random.split(jax.random.fold_in(key, index))
        x0, labels, log_p = _data(distribution, data_key, num_examples)
        nelbo, _ = _per_example_terms(make_objective(count), model, x0, labels, objective_key)
        gap, error = _mean_and_error(np.asarray(nelbo, np.float64) + log_p)
        gaps.append(gap)
        errors.append(error)
    bound = all(g >= -z * e for g, e in zip(gaps, errors, strict=True))
    monotone = all(
        gaps[i] - gaps[i + 1] >= -z * math.hypot(errors[i], errors[i + 1])
        for i in range(len(steps) - 1)
    )
    shrinks = gaps[0] - gaps[-1] > z * math.hypot(errors[0], errors[-1])
    passed = bool(bound and monotone and shrinks and all(np.isfinite(gaps)))
    shown = ", ".join(
        f"T={count}: {gap:.4f}±{error:.4f}" for count, gap, error in zip(steps, gaps, errors, strict=True)
    )
    failures = [
        name
        for name, ok in (("not a bound", bound), ("not monotone", monotone), ("does not shrink", shrinks))
        if not ok
    ]
    summary = (
        f"E[nelbo_T] - H(p) = {shown} nats over {num_examples} examples each, "
        f"tolerance {z} se (false alarm {normal_false_alarm(z):.1e} per comparison)"
        + (f"; {', '.join(failures)}" if failures else "")
    )
    numbers = {f"gap_T{count}": gap for count, gap in zip(steps, gaps, strict=True)}
    numbers.update({f"se_T{count}": error for count, error in zip(steps, errors, strict=True)})
    numbers["entropy"] = distribution.conditional_entropy()
    return CheckResult(
        "discrete_bound",
        subject or f"{_describe(make_objective(steps[0]))} on a toy",
        passed,
        summary,
        numbers,
    )


def check_entropy_bound(
    objective: AbstractObjective,
    model: DiffusionModel,
    distribution: ToyDistribution,
    *,
    key: jax.Array,
    num_examples: int = 2**13,
    z: float = 4.0,
    subject: str | None = None,
) -> CheckResult:
    """(c) Any model's expected objective over the data is at least H(p): the objective
    bounds -log p_model(x) from above, and E_p[-log p_model] >= H(p) (Gibbs). Passes when
    mean nelbo >= H(p) - z se over ``num_examples`` draws x ~ p."""
    data_key, objective_key = jax.random.split(key)
    x0, labels, _ = _data(distribution, data_key, num_examples)
    nelbo, _ = _per_example_terms(objective, model, x0, labels, objective_key)
    mean, error = _mean_and_error(np.asarray(nelbo, np.float64))
    entropy = distribution.conditional_entropy()
    passed = bool(np.isfinite(mean) and mean >= entropy - z * error)
    summary = (
        f"E[nelbo] = {mean:.4f} ± {error:.4f} nats over {num_examples} examples vs "
        f"H(p) = {entropy:.4f}, required E[nelbo] >= H(p) - {z} se "
        f"(false alarm {normal_false_alarm(z) / 2:.1e})"
    )
    numbers = {
        "mean_nelbo": mean,
        "standard_error": error,
        "entropy": entropy,
        "num_examples": num_examples,
    }
    return CheckResult(
        "entropy_bound", subject or f"{_describe(objective)} on a toy", passed, summary, numbers
    )


def check_schedule_invariance(
    objective: AbstractObjective,
    make_model: Callable[[AbstractSchedule], DiffusionModel],
    schedules: Mapping[str, AbstractSchedule],
    distribution: ToyDistribution,
    *,
    key: jax.Array,
    num_examples: int = 2**15,
    z: float = 4.0,
    endpoint_nats: float = 25.0,
    subject: str | None = None,
) -> CheckResult:
    """(e) The continuous-time ELBO does not depend on the schedule's shape (MD4 sec. 4):
    for a model whose prediction ignores t, substituting alpha for t turns the integral
    into one over alpha in [alpha_1, alpha_0], so schedules with the same end points give
    the same expected ELBO.

    ``make_model(schedule)`` builds the model (its network must ignore t; a deliberately
    wrong oracle makes the comparison non-trivial). Every schedule is evaluated on the same
    ``num_examples`` draws with the same key; each is compared with the first through the
    paired per-example differences, within z se plus an allowance for differing end
    points of D (|d alpha_0| + |d alpha_1|) ``endpoint_nats`` (a bound on how much one
    position's terms can move per unit of survival probability).
    """
    names = list(schedules)
    data_key, objective_key = jax.random.split(key)
    x0, labels, _ = _data(distribution, data_key, num_examples)
    values, ends = {}, {}
    for name in names:
        schedule = schedules[name]
        nelbo, _ = _per_example_terms(objective, make_model(schedule), x0, labels, objective_key)
        values[name] = np.asarray(nelbo, np.float64)
        ends[name] = (
            float(jnp.mean(schedule.alpha(jnp.zeros(())))),
            float(jnp.mean(schedule.alpha(jnp.ones(())))),
        )
    reference = names[0]
    rows, passed, numbers = [], True, {}
    for name in names:
        mean, error = _mean_and_error(values[name])
        numbers[f"mean_nelbo_{name}"] = mean
        if name == reference:
            rows.append(f"{name}: {mean:.4f}")
            continue
        difference, difference_error = _mean_and_error(values[name] - values[reference])
        shift = abs(ends[name][0] - ends[reference][0]) + abs(ends[name][1] - ends[reference][1])
        allowance = distribution.seq_len * shift * endpoint_nats
        ok = bool(np.isfinite(difference) and abs(difference) <= z * difference_error + allowance)
        passed = passed and ok
        numbers[f"difference_{name}"] = difference
        numbers[f"difference_se_{name}"] = difference_error
        rows.append(
            f"{name}: {mean:.4f} (minus {reference}: {difference:+.4f} ± {difference_error:.4f}, "
            f"allowed {z} se + {allowance:.1e}{'' if ok else ' FAILED'})"
        )
    summary = (
        f"E[nelbo] over {num_examples} shared examples: " + "; ".join(rows)
        + f" (false alarm {normal_false_alarm(z):.1e} per comparison)"
    )
    return CheckResult(
        "schedule_invariance",
        subject or f"{_describe(objective)} on a toy",
        passed,
        summary,
        numbers,
    )


@eqx.filter_jit
def _example_gradients(objective, model, where, x0, labels, key):
    """Per example: the gradient of the objective's ``loss`` with respect to the inexact
    arrays of ``where(model)``, flattened, and its ``nelbo``; times and noise keyed as
    :meth:`AbstractObjective.per_example_terms` keys them."""
    count = x0.shape[0]
    time_key, noise_key = jax.random.split(key)
    times = objective.sample_times(time_key, count)
    keys = jax.vmap(lambda i: jax.random.fold_in(noise_key, i))(jnp.arange(count))
    params, static = eqx.partition(where(model), eqx.is_inexact_array)

    def one(params, x, t, k, label):
        full = eqx.tree_at(where, model, eqx.combine(params, static))
        terms = objective.example_terms(full, x, t, key=k, label=label, train=False)
        return terms.loss, terms.nelbo

    def gradient(x, t, k, label):
        grads, nelbo = jax.grad(one, has_aux=True)(params, x, t, k, label)
        return jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(grads)]), nelbo

    return jax.vmap(gradient)(x0, times, keys, labels)


@eqx.filter_jit
def _exact_value_and_gradient(exact_nelbo, where, model):
    params, static = eqx.partition(where(model), eqx.is_inexact_array)

    def exact(params):
        return exact_nelbo(eqx.tree_at(where, model, eqx.combine(params, static)))

    return jax.value_and_grad(exact)(params)


def check_gradient(
    objective: AbstractObjective,
    model: DiffusionModel,
    distribution: ToyDistribution,
    exact_nelbo: Callable[[DiffusionModel], jax.Array],
    *,
    where: Callable[[DiffusionModel], object],
    key: jax.Array,
    num_examples: int = 2**14,
    z: float = 4.0,
    rtol: float = 1e-3,
    subject: str | None = None,
) -> CheckResult:
    """(f) An objective's gradient estimate is unbiased: the mean over ``num_examples``
    draws (x ~ p, the objective's times and noise) of the gradient of its ``loss`` with
    respect to the parameters ``where(model)`` (e.g. ``lambda m: m.process.schedule``)
    equals the exact gradient of the bound, ``jax.grad(exact_nelbo)``, and the mean of
    its ``nelbo`` equals ``exact_nelbo(model)``. A surrogate loss (REINFORCE) is judged
    by its gradient only; its value may differ from the bound.

    ``exact_nelbo(model)`` computes E_x[nelbo] exactly, differentiably (by enumeration,
    e.g. with :func:`exact_diffusion_nelbo` plus the objective's end terms); it runs in
    float64 (``jax.enable_x64``) on a float64 copy of the model, where 1 - alpha_t is
    resolved close to t = 0. Each gradient coordinate and the value must agree within
    z standard errors of the mean plus ``rtol`` of the exact number (the quadrature's
    and float32's share); with P coordinates the false-alarm rate is at most
    (P + 1) x 2 Phi(-z).
    """
    data_key, objective_key = jax.random.split(key)
    x0, labels = distribution.sample(data_key, num_examples)
    estimates, nelbo = _example_gradients(objective, model, where, x0, labels, objective_key)
    estimates = np.asarray(estimates, np.float64)
    with jax.enable_x64(True):
        value, grads = _exact_value_and_gradient(exact_nelbo, where, _float64(model))
        value = float(value)
        exact_gradient = np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in jax.tree.leaves(grads)])
    mean = estimates.mean(axis=0)
    error = estimates.std(axis=0, ddof=1) / math.sqrt(num_examples)
    allowed = z * error + rtol * np.abs(exact_gradient)
    gradient_ok = np.abs(mean - exact_gradient) <= allowed
    mean_nelbo, nelbo_error = _mean_and_error(np.asarray(nelbo, np.float64))
    value_allowed = z * nelbo_error + rtol * abs(value)
    value_ok = abs(mean_nelbo - value) <= value_allowed
    passed = bool(np.all(gradient_ok) and value_ok and np.all(np.isfinite(mean)))
    rows = "; ".join(
        f"[{i}] {m:+.5f} ± {e:.5f} vs {g:+.5f}{'' if ok else ' FAILED'}"
        for i, (m, e, g, ok) in enumerate(zip(mean, error, exact_gradient, gradient_ok, strict=True))
    )
    count = len(exact_gradient)
    summary = (
        f"gradient over {num_examples} examples (estimate ± se vs exact): {rows}; "
        f"E[nelbo] = {mean_nelbo:.5f} ± {nelbo_error:.5f} vs exact {value:.5f}"
        f"{'' if value_ok else ' FAILED'}; allowed {z} se + {rtol:g} relative "
        f"(false alarm <= {(count + 1) * normal_false_alarm(z):.1e})"
    )
    numbers = {f"gradient_{i}": float(m) for i, m in enumerate(mean)}
    numbers.update({f"gradient_se_{i}": float(e) for i, e in enumerate(error)})
    numbers.update({f"exact_gradient_{i}": float(g) for i, g in enumerate(exact_gradient)})
    numbers.update(
        {"mean_nelbo": mean_nelbo, "nelbo_se": nelbo_error, "exact_nelbo": value, "num_examples": num_examples}
    )
    return CheckResult(
        "gradient", subject or f"{_describe(objective)} on a toy", passed, summary, numbers
    )


# --------------------------------------------------------------------------- samplers


def chi_square_test(
    observed: np.ndarray, probabilities: np.ndarray, *, constraints: int = 1, min_expected: float = 5.0
) -> dict[str, float]:
    """Pearson's chi-square goodness-of-fit test of counts against probabilities.

    Cells whose expected count is below ``min_expected`` are pooled into one cell (so
    the chi-square approximation holds); ``constraints`` is the number of linear
    constraints the expected counts satisfy (1 for a fixed total; one per class when
    totals are fixed per class). Counts in cells of probability 0 are reported as
    ``impossible``: an exact sampler never produces them.

    Returns:
        chi2, dof, p_value, tv (total variation between the empirical and expected
        frequencies), impossible (count in zero-probability cells), num (total count).
    """
    from scipy import stats

    observed = np.asarray(observed, np.float64).ravel()
    probabilities = np.asarray(probabilities, np.float64).ravel()
    total = observed.sum()
    expected = total * probabilities
    impossible = float(observed[probabilities == 0].sum())
    possible = probabilities > 0
    regular = possible & (expected >= min_expected)
    pooled = possible & ~regular
    cells_observed = list(observed[regular])
    cells_expected = list(expected[regular])
    if pooled.any():
        cells_observed.append(observed[pooled].sum())
        cells_expected.append(expected[pooled].sum())
    cells_observed, cells_expected = np.asarray(cells_observed), np.asarray(cells_expected)
    chi2 = float(np.sum((cells_observed - cells_expected) ** 2 / cells_expected))
    dof = max(len(cells_expected) - constraints, 1)
    return {
        "chi2": chi2,
        "dof": float(dof),
        "p_value": float(stats.chi2.sf(chi2, dof)),
        "tv": float(0.5 * np.abs(observed / total - probabilities).sum()),
        "impossible": impossible,
        "num": float(total),
    }


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
    spec, labels, fixed_tokens, fixed_mask = sampling_conditioning(
        distribution, conditioning, key=condition_key, num_samples=num_samples
    )
    output = _sample(sampler, model, sample_key, spec, num_samples, seq_len)
    tokens = np.asarray(output.tokens)
    evals = int(output.num_function_evals)
    problems = []
    if tokens.shape != (num_samples, seq_len):
        problems.append(f"output shape {tokens.shape}, expected {(num_samples, seq_len)}")
    if tokens.min() < 0 or tokens.max() >= distribution.vocab_size:
        problems.append(f"tokens outside 0..{distribution.vocab_size - 1} (a mask left?)")
        tokens = np.clip(tokens, 0, distribution.vocab_size - 1)
    if fixed_mask is not None:
        changed = int(np.sum(np.asarray(fixed_mask) & (tokens != np.asarray(fixed_tokens))))
        if changed:
            problems.append(f"{changed} given positions changed")
    if evals <= 0:
        problems.append(f"reported {evals} network evaluations")
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


# --------------------------------------------------------------------------- exact terms


BOUND_TERMS = ("prior", "reconstruction", "diffusion")
"""The terms of :class:`ddiff.BoundForm` that an objective may report as metrics."""


def _show(sequence) -> str:
    return "(" + ", ".join(str(int(v)) for v in sequence) + ")"


def check_bound_terms(
    objective: AbstractObjective,
    model: DiffusionModel,
    x0s: np.ndarray,
    *,
    key: jax.Array,
    num_examples: int = 2**14,
    z: float = 4.0,
    rtol: float = 1e-4,
    atol: float = 1e-6,
    exact: Mapping[str, np.ndarray] | None = None,
    subject: str | None = None,
) -> CheckResult:
    """(g) An objective is an unbiased estimate of the bound it declares
    (:meth:`ddiff.AbstractObjective.bound_form`) for any model, term by term and x_0 by
    x_0.

    ``num_examples`` draws, the K clean sequences ``x0s`` in turn (so each gets
    num_examples / K of the objective's own times and noise), are averaged per x_0: the
    ``nelbo`` and every reported term among ``prior``, ``reconstruction``, ``diffusion``
    must each lie within z standard errors plus ``rtol`` of the exact value plus ``atol``
    (float32's and the quadrature's share) of its exact value, computed in float64 by
    :func:`ddiff.testing.exact_bound_terms` (every noisy sequence enumerated, Gauss-Legendre
    quadrature in t). With a model whose predictions are arbitrary functions of (x_t, t)
    (:func:`ddiff.testing.table_model`) nothing averages out: a term that is wrong but
    zero on average under the exact denoiser, mass moved from one term to another, or a
    discrete-time objective that is not the T-step bound, all show. Each term is also
    compared pooled over the K sequences (their mean against the mean of the exact
    values), where a bias of the same sign at every x_0 shows sqrt(K) times more clearly.
    With 4 terms and K + 1 comparisons each the false-alarm rate is at most
    4 (K + 1) x 2 Phi(-z) (K = 4, z = 4: 1.3e-3); deterministic terms (standard error 0)
    are compared to the tolerance alone. Every standard error is at least that of the
    one-draw estimate (one time, one noisy sequence), whose variance the reference
    computes exactly: with a table model the estimates can be heavy-tailed (large rates at
    a few times) or rare events (a position still noisy at t = 0), and a sample's spread
    then underestimates them; averaging over antithetic times and extra draws only lowers
    the true variance, so the floor is conservative.
    """
    x0s = np.asarray(x0s, np.int64)
    count = len(x0s)
    per_x0 = max(num_examples // count, 2)
    if exact is None:
        form = objective.bound_form()
        if form is None:
            raise DdiffError(
                f"{_describe(objective)} declares no bound (bound_form() is None): nothing to "
                f"compare its terms with"
            )
        exact = exact_bound_terms(form, model, x0s)
    batch = jnp.asarray(np.tile(x0s, (per_x0, 1)), jnp.int32)
    terms = _bound_metrics(objective, model, batch, key)
    rows, failures, numbers, passed = [], [], {}, True
    for name in ("nelbo", *BOUND_TERMS):
        if name not in terms:
            continue
        values = np.asarray(terms[name], np.float64).reshape(per_x0, count)
        means = values.mean(0)
        errors = values.std(0, ddof=1) / math.sqrt(per_x0)
        if f"{name}_variance" in exact:
            # The variance of the one-draw estimate, exactly: heavy tails and rare events
            # (a position still noisy at t = 0) that the sample may have missed keep their
            # share of the standard error.
            errors = np.maximum(errors, np.sqrt(np.asarray(exact[f"{name}_variance"]) / per_x0))
        target = np.asarray(exact[name], np.float64)
        # The K sequences one by one, then pooled: a bias of the same sign at every x_0
        # (the usual mistake) shows sqrt(K) times more clearly in their average.
        means = np.append(means, means.mean())
        errors = np.append(errors, math.sqrt(np.sum(errors**2)) / count)
        target = np.append(target, target.mean())
        allowed = z * errors + rtol * np.abs(target) + atol
        ok = np.isfinite(means) & (np.abs(means - target) <= allowed)
        passed = passed and bool(ok.all())
        for k in range(count + 1):
            numbers[f"{name}_{k}"] = float(means[k])
            numbers[f"{name}_se_{k}"] = float(errors[k])
            numbers[f"{name}_exact_{k}"] = float(target[k])
            off = means[k] - target[k]
            score = off / errors[k] if errors[k] > 0 else (0.0 if off == 0 else math.copysign(math.inf, off))
            numbers[f"{name}_z_{k}"] = float(score)
            if not ok[k]:
                where = f"x_0 = {_show(x0s[k])}" if k < count else "the mean over the x_0"
                failures.append(
                    f"{where}: {name} {means[k]:.5f} ± {errors[k]:.5f} vs exact "
                    f"{target[k]:.5f} (off by {off:+.5f} nats, {score:+.1f} se)"
                )
        rows.append(
            f"{name} " + ", ".join(f"{m:.4f}±{e:.4f}/{t:.4f}" for m, e, t in zip(means, errors, target, strict=True))
        )
    comparisons = sum(1 for name in ("nelbo", *BOUND_TERMS) if name in terms) * (count + 1)
    summary = (
        (f"OFF: {'; '.join(failures)}. " if failures else "")
        + f"estimate ± se / exact per x_0 {', '.join(_show(x) for x in x0s)} and their mean, "
        f"over {per_x0} draws each: " + "; ".join(rows)
        + f"; allowed {z} se + {rtol:g} relative + {atol:g} (false alarm <= "
        f"{comparisons * normal_false_alarm(z):.1e})"
    )
    numbers.update({"num_examples": float(per_x0 * count), "z": z})
    return CheckResult(
        "bound_terms", subject or f"{_describe(objective)} on a toy", passed, summary, numbers
    )


@eqx.filter_jit
def _bound_metrics(objective, model, x0, key):
    terms = objective.per_example_terms(model, x0, key=key, train=False)
    found = {name: terms.metrics[name] for name in BOUND_TERMS if name in terms.metrics}
    return {"nelbo": terms.nelbo, **found}


# --------------------------------------------------------------------------- reverse chains


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
