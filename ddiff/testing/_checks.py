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

from ddiff._model import DiffusionModel
from ddiff._objective import AbstractObjective
from ddiff._sampler import AbstractSampler, Conditioning, sample_keys
from ddiff._schedule import AbstractSchedule
from ddiff.testing._exact import prior_gap
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


def _float64(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, tree)


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
