"""The conformance checks of an objective: (a) tight, (b) discrete bound, (c) entropy
bound, (e) schedule invariance, (f) gradient, (g) bound terms.

(a)-(c) and (e) drive the objective with the oracle (or a deliberately wrong one) on
draws x ~ p and compare its mean with exact entropies; (f) compares a gradient estimate
with the gradient of an exact bound; (g) compares every term of the declared bound with
its exact value for any model (:func:`ddiff.testing.exact_bound_terms`).
"""

import math
from collections.abc import Callable, Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ddiff._errors import DdiffError
from ddiff._model import DiffusionModel
from ddiff._objective import AbstractObjective
from ddiff._schedule import AbstractSchedule
from ddiff.testing._bounds import exact_bound_terms
from ddiff.testing._exact import prior_gap
from ddiff.testing._process_tables import _float64
from ddiff.testing._results import (
    CheckResult,
    _describe,
    _mean_and_error,
    _show,
    normal_false_alarm,
)
from ddiff.testing._toy import ToyDistribution

BOUND_TERMS = ("prior", "reconstruction", "diffusion")
"""The terms of :class:`ddiff.BoundForm` that an objective may report as metrics."""


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


def _on_draws(objective, model, distribution: ToyDistribution, key, num: int):
    """The objective's nelbo and reported reconstruction at ``num`` draws x ~ p (float64),
    and log p(x): the data from one half of ``key``, the objective's times and noise from
    the other."""
    data_key, objective_key = jax.random.split(key)
    x0, labels, log_p = _data(distribution, data_key, num)
    nelbo, reconstruction = _per_example_terms(objective, model, x0, labels, objective_key)
    return np.asarray(nelbo, np.float64), np.asarray(reconstruction, np.float64), log_p


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
    nelbo, reconstruction, log_p = _on_draws(objective, model, distribution, key, num_examples)
    gap, error = _mean_and_error(nelbo + log_p)
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
        nelbo, _, log_p = _on_draws(
            make_objective(count), model, distribution, jax.random.fold_in(key, index), num_examples
        )
        gap, error = _mean_and_error(nelbo + log_p)
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
    nelbo, _, _ = _on_draws(objective, model, distribution, key, num_examples)
    mean, error = _mean_and_error(nelbo)
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
