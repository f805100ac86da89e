"""Mutation testing of the conformance kit: plausible mistakes in objectives, their terms,
schedules' derivatives, discrete bounds, grid and first-hitting samplers, score
conversions, D3PM posteriors and guidance, each a small subclass or wrapper of a correct
built-in, each of which the kit's public checks must reject.

Each mutant is registered under its own name in a copy of the default registry and run
through ``ddiff.testing.objective_checks`` / ``sampler_checks`` exactly as a plugin
author's component would be, on the line of ``tests/test_conformance.py`` its correct
counterpart passes (``tests/conformance_lines.py``); ``test_the_built_ins_pass_the_same_checks``
runs the correct components on the few checks ``test_conformance.py`` does not have. The margins (how far each mutant is from passing)
are printed with ``pytest -rA``; docs/conformance.md lists them.
"""

import dataclasses
import math

import conformance_lines as lines
import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from ddiff_plugins import campbell, d3pm, genmd4, masked, md4, sedd, uniform

import ddiff
from ddiff.testing import objective_checks, sampler_checks

# --------------------------------------------------------------------------- objectives


class SelfTargetELBO(md4.MD4ContinuousELBO):
    """MD4's ELBO with the model's own prediction as the target: the cross-entropy
    -log mu[x_0] replaced by the entropy of mu. Under the exact denoiser the two have the
    same expectation, so the oracle checks cannot see it."""

    def example_terms(self, model, x0, t, *, key, label=None, train=True):
        process = model.process
        noise_key, network_key = jax.random.split(key)
        x_t = process.sample_marginal(x0, t, key=noise_key)
        log_mean = model.log_mean(x_t, t, label=label, key=network_key if train else None)
        soft = jnp.sum(jnp.where(jnp.isfinite(log_mean), jnp.exp(log_mean) * log_mean, 0.0), -1)
        log_likelihood = jnp.sum(jnp.where(x_t == process.mask_id, soft, 0.0))
        return ddiff.bound_terms(model, x0, md4.elbo_weight(process.schedule, t) * log_likelihood)


class MaskCountingReconstruction(md4.MD4ContinuousELBO):
    """MD4's ELBO whose decoder counts the mask among the values: reconstruction
    D (1 - alpha_0) log(V + 1) instead of log V. The tightness check allows any
    reconstruction the objective reports, so it passes."""

    def example_terms(self, model, x0, t, *, key, label=None, train=True):
        terms = md4.MD4ContinuousELBO.example_terms(self, model, x0, t, key=key, label=label, train=train)
        process = model.process
        wrong = x0.shape[0] * (1.0 - process.schedule.alpha(jnp.zeros(()))) * math.log(process.vocab_size + 1)
        nelbo = terms.nelbo - terms.metrics["reconstruction"] + wrong
        return ddiff.ObjectiveTerms(loss=nelbo, nelbo=nelbo, metrics={**terms.metrics, "reconstruction": wrong})


class GenMD4WithoutDecoder(genmd4.GenMD4ELBO):
    """GenMD4's ELBO without its reconstruction term at t1 (alpha_0 = 1 makes it look
    unnecessary): the integral starts at t1, so the bound loses the decoder there."""

    def example_terms(self, model, x0, t, *, key, label=None, train=True):
        terms = genmd4.GenMD4ELBO.example_terms(self, model, x0, t, key=key, label=label, train=train)
        dropped = terms.metrics["reconstruction"]
        metrics = {**terms.metrics, "reconstruction": jnp.zeros_like(dropped)}
        return ddiff.ObjectiveTerms(loss=terms.loss - dropped, nelbo=terms.nelbo - dropped, metrics=metrics)


class GenMD4WithoutRateTerms(genmd4.GenMD4ELBO):
    """GenMD4's integrand without the rate terms: w[x_0] log mu[x_0] alone, dropping
    w[x_0] - w . mu, which is zero on average under the exact denoiser."""

    def example_terms(self, model, x0, t, *, key, label=None, train=True):
        process = model.process
        time = self.t1 + (1.0 - self.t1) * t
        weight = jnp.broadcast_to(genmd4.elbo_weight(process.schedule, time), (process.vocab_size,))

        def draw(draw_key):
            x_t = process.sample_marginal(x0, time, key=draw_key)
            log_mean = model.log_mean(x_t, time, label=label)
            picked = jnp.take_along_axis(log_mean, x0[:, None], axis=-1)[:, 0]
            masked = x_t == process.mask_id
            return (1.0 - self.t1) * jnp.sum(jnp.where(masked, weight[x0] * picked, 0.0))

        diffusion = jnp.mean(jax.vmap(draw)(jax.random.split(key)))
        recon = genmd4.reconstruction(process.schedule, x0, jnp.asarray(self.t1))
        prior = process.prior_kl(x0)
        nelbo = diffusion + recon + prior
        metrics = {"diffusion": diffusion, "reconstruction": recon, "prior": prior}
        return ddiff.ObjectiveTerms(loss=nelbo, nelbo=nelbo, metrics=metrics)


class DiscreteELBOAtStepEnd(md4.MD4DiscreteELBO):
    """MD4's discrete-time ELBO whose network sees the step's end s = t - 1/T instead of
    t: above the entropy and shrinking with T, and the same under a denoiser that ignores
    t (the exact one), but not the T-step bound."""

    def example_terms(self, model, x0, t, *, key, label=None, train=True):
        schedule = model.process.schedule
        s = jnp.maximum(t - 1.0 / self.steps, 0.0)
        weight = self.steps * (schedule.alpha(s) - schedule.alpha(t)) / (1.0 - schedule.alpha(t))
        noise_key, network_key = jax.random.split(key)
        x_t = model.process.sample_marginal(x0, t, key=noise_key)
        log_mean = model.log_mean(x_t, s, label=label, key=network_key if train else None)
        picked = jnp.take_along_axis(log_mean, x0[:, None], axis=-1)[:, 0]
        log_likelihood = jnp.sum(jnp.where(x_t == model.process.mask_id, picked, 0.0))
        return ddiff.bound_terms(model, x0, -weight * log_likelihood)


class HybridInBound(d3pm.D3PMBound):
    """D3PM's L_vb reporting the hybrid loss (L_vb + lambda T CE) as its bound (run with
    lambda = 0.1: at the line's 0.01 it adds 0.3 nats, under the kit's resolution there)."""

    def example_terms(self, model, x0, t, *, key, label=None, train=True):
        terms = d3pm.D3PMBound.example_terms(self, model, x0, t, key=key, label=label, train=train)
        return ddiff.ObjectiveTerms(loss=terms.loss, nelbo=terms.loss, metrics=terms.metrics)


class ScoreEntropyWithoutConstant(sedd.ScoreEntropy):
    """Score entropy without its constant K(a) = a (log a - 1): sum R (s - a log s), the
    training loss of SEDD's code, reported as the bound."""

    def example_terms(self, model, x0, t, *, key, label=None, train=True):
        process = model.process
        noise_key, network_key = jax.random.split(key)
        x_t = process.sample_marginal(x0, t, key=noise_key)
        log_score = model.log_score(x_t, t, label=label, key=network_key if train else None)
        rates = process.incoming_rates(x_t, t)
        probs = process.marginal_probs(x0, t)
        ratio = probs / jnp.take_along_axis(probs, x_t[:, None], axis=-1)
        active = (rates > 0) & ~jax.nn.one_hot(x_t, process.num_states, dtype=bool)
        safe = jnp.where(active, log_score, 0.0)
        terms = jnp.where(active, rates * (jnp.exp(safe) - ratio * safe), 0.0)
        return ddiff.bound_terms(model, x0, jnp.sum(terms))


# --------------------------------------------------------------------------- schedules


class CosineWithoutHalfPi(masked.CosineSchedule):
    """The cosine schedule whose derivative misses the chain rule's pi/2."""

    def shape_derivative(self, t):
        return -jnp.sin(0.5 * math.pi * (1.0 - t))


class PolyWithWrongExponent(masked.PolySchedule):
    """The polynomial schedule 1 - t^k with derivative -k t^k instead of -k t^(k-1)."""

    def shape_derivative(self, t):
        return -self.power * t**self.power


# --------------------------------------------------------------------------- processes


class InvertedRatioMaskedProcess(masked.MaskedProcess):
    """The masked process reading a mean as scores with r = (1 - alpha)/alpha instead of
    alpha/(1 - alpha)."""

    def log_score_from_mean(self, log_mean, x_t, t):
        score = masked.MaskedProcess.log_score_from_mean(self, log_mean, x_t, t)
        alpha = self.schedule.alpha(t)
        log_ratio = jnp.log(alpha) - jnp.log1p(-alpha)
        noisy = (x_t == self.mask_id)[:, None] & (jnp.arange(self.num_states) < self.vocab_size)[None, :]
        return jnp.where(noisy, score - 2.0 * log_ratio, score)


class UncorrectedTweedieUniformProcess(uniform.UniformProcess):
    """The uniform process whose Tweedie denoiser forgets the b sum(s) correction:
    w = s / alpha instead of (s - b sum(s)) / alpha."""

    def log_mean_from_score(self, log_score, x_t, t):
        a = self.schedule.alpha(t)
        weights = jnp.exp(log_score) / a
        likelihood = self._mix(x_t, a)
        mean = ddiff.possible_mean(jnp.log(weights * likelihood), likelihood > 0)
        return jnp.where(mean > 0, jnp.log(jnp.where(mean > 0, mean, 1.0)), -jnp.inf)


class JointWeightedUniformProcess(uniform.UniformProcess):
    """The uniform process whose reverse step from a mean is D3PM's code's: x_0 weighted
    by the joint q(x_s, x_t | x_0) instead of averaging the true posterior over mu."""

    def log_posterior_from_mean(self, x_t, log_mean, s, t):
        # q(x_t | x_s) sum_v mu[v] q(x_s | x_0 = v), normalised: the joint weighting.
        probs = self.transition_likelihood(x_t, s, t) * self.propagate(jnp.exp(log_mean), jnp.zeros(()), s)
        return ddiff.log_normalize(ddiff.safe_log(probs))


# --------------------------------------------------------------------------- samplers


class UnnormalisedAncestralSampler(md4.AncestralSampler):
    """MD4 Alg. 2 with the unmasking probability alpha_s - alpha_t, not divided by
    1 - alpha_t (the stay probability keeps its division)."""

    def draw(self, key, log_mean, alpha_s, alpha_t):
        log_unmask = jnp.log(jnp.maximum(alpha_s - alpha_t, 0.0))
        log_stay = jnp.log1p(-alpha_s) - jnp.log1p(-alpha_t)
        stay = jnp.broadcast_to(log_stay, (*log_mean.shape[:-1], 1))
        return ddiff.categorical(key, jnp.concatenate([log_unmask + log_mean, stay], axis=-1))


class GridIgnoringAncestralSampler(md4.AncestralSampler):
    """Ancestral sampling that always steps on the uniform grid, whatever ``grid`` says."""

    def sample(self, model, *, keys, seq_len, conditioning):
        uniform = dataclasses.replace(self, grid="uniform")
        return md4.AncestralSampler.sample(
            uniform, model, keys=keys, seq_len=seq_len, conditioning=conditioning
        )


class _OffByOneNucleus(ddiff.AbstractLogProbTransform):
    top_p: float = eqx.field(static=True)

    def __call__(self, log_mean):
        order = jnp.argsort(-log_mean, axis=-1)
        ordered = jnp.take_along_axis(jnp.exp(log_mean), order, axis=-1)
        keep_sorted = (jnp.cumsum(ordered, axis=-1) < self.top_p).at[..., 0].set(True)
        keep = jnp.zeros_like(keep_sorted).at[(*jnp.indices(order.shape)[:-1], order)].set(keep_sorted)
        return jax.nn.log_softmax(jnp.where(keep, log_mean, -jnp.inf), axis=-1)

    def as_top_p(self):
        return self.top_p


class OffByOneNucleusSampler(md4.TopPSampler):
    """Top-p keeping a value only when the mass up to and including it is below top_p
    (the nucleus one value short)."""

    @property
    def transforms(self):
        return (_OffByOneNucleus(self.top_p),)


class OutgoingRatesEulerSampler(sedd.EulerSampler):
    """SEDD's Euler step with the rates out of x, R_t(x^n -> y), instead of into it."""

    def step_probs(self, process, x, log_score, s, t):
        outgoing = process.forward_rates(x, t)
        moving = (outgoing > 0) & ~jax.nn.one_hot(x, process.num_states, dtype=bool)
        rates = jnp.where(moving, outgoing * jnp.exp(jnp.where(moving, log_score, 0.0)), 0.0)
        moves = (t - s) * rates
        stay = jnp.maximum(1.0 - jnp.sum(moves, axis=-1, keepdims=True), 0.0)
        return moves + stay * jax.nn.one_hot(x, process.num_states)


class PropagatingAnalyticSampler(sedd.AnalyticSampler):
    """SEDD's analytic step with the staggered score pushed forward through Q_{s->t}
    instead of back through its inverse."""

    def step_probs(self, process, x, log_score, s, t):
        staggered = process.propagate(jnp.exp(log_score), s, t)
        return jnp.maximum(staggered, 0.0) * process.transition_likelihood(x, s, t)


class _ShiftedNetwork(ddiff.AbstractNetwork):
    inner: ddiff.AbstractNetwork
    shift: float = eqx.field(static=True)
    time_conditioned: bool = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)

    def __call__(self, x_t, t, *, label=None, key=None):
        return self.inner(x_t, jnp.maximum(t - self.shift, 0.0), label=label, key=key)


class LateRatesTauLeapingSampler(ddiff.AbstractSampler):
    """Tau-leaping whose rates come from the prediction at the end of each leap (t - 1/T)
    instead of its start."""

    requires = campbell.TauLeapingSampler.requires
    steps: int = eqx.field(static=True, default=256)

    def reverse_chain(self):
        return campbell.TauLeapingSampler(steps=self.steps).reverse_chain()

    def sample(self, model, *, keys, seq_len, conditioning):
        network = model.network
        late = _ShiftedNetwork(network, 1.0 / self.steps, network.time_conditioned, network.num_classes)
        return campbell.TauLeapingSampler(steps=self.steps).sample(
            eqx.tree_at(lambda m: m.network, model, late),
            keys=keys, seq_len=seq_len, conditioning=conditioning,
        )


class LinearTimeFirstHittingSampler(ddiff.AbstractSampler):
    """First-hitting sampling that inverts alpha as if the schedule were linear
    (t = 1 - alpha): the hitting times in t, where the network is evaluated, are wrong
    for any other schedule."""

    requires = md4.FirstHittingSampler.requires

    def reverse_chain(self):
        return md4.FirstHittingSampler().reverse_chain()

    def sample(self, model, *, keys, seq_len, conditioning):
        linear = eqx.tree_at(lambda m: m.process.schedule, model, masked.LinearSchedule())
        return md4.FirstHittingSampler().sample(
            linear, keys=keys, seq_len=seq_len, conditioning=conditioning
        )


class ScalarScheduleGenMD4Sampler(ddiff.AbstractSampler):
    """GenMD4's ancestral sampler reading one schedule for every value (the mean of the
    learned parameters) instead of the per-value one."""

    requires = genmd4.StateDependentAncestralSampler.requires
    steps: int = eqx.field(static=True, default=128)

    def reverse_chain(self):
        return genmd4.StateDependentAncestralSampler(steps=self.steps).reverse_chain()

    def sample(self, model, *, keys, seq_len, conditioning):
        phi = model.process.schedule.phi
        flat = eqx.tree_at(lambda m: m.process.schedule.phi, model, jnp.full_like(phi, jnp.mean(phi)))
        return genmd4.StateDependentAncestralSampler(steps=self.steps).sample(
            flat, keys=keys, seq_len=seq_len, conditioning=conditioning
        )


class GuidanceConventionSampler(ddiff.AbstractSampler):
    """Ancestral sampling with guidance written w c - (w - 1) u, the other common
    convention, instead of ddiff's (1 + w) c - w u."""

    requires = md4.AncestralSampler.requires
    steps: int = eqx.field(static=True, default=128)

    def reverse_chain(self):
        return md4.AncestralSampler(steps=self.steps).reverse_chain()

    def sample(self, model, *, keys, seq_len, conditioning):
        shifted = dataclasses.replace(conditioning, guidance=conditioning.guidance - 1.0)
        return md4.AncestralSampler(steps=self.steps).sample(
            model, keys=keys, seq_len=seq_len, conditioning=shifted
        )


class LateInfillSampler(ddiff.AbstractSampler):
    """Infilling by overwriting the given positions at the end only: the network never
    sees them."""

    requires = md4.AncestralSampler.requires
    steps: int = eqx.field(static=True, default=128)

    def reverse_chain(self):
        return md4.AncestralSampler(steps=self.steps).reverse_chain()

    def sample(self, model, *, keys, seq_len, conditioning):
        free = ddiff.Conditioning(labels=conditioning.labels, guidance=conditioning.guidance)
        output = md4.AncestralSampler(steps=self.steps).sample(
            model, keys=keys, seq_len=seq_len, conditioning=free
        )
        return ddiff.SampleOutput(
            tokens=ddiff.apply_fixed(conditioning, output.tokens), num_function_evals=output.num_function_evals
        )


# --------------------------------------------------------------------------- the lines


MUTANTS = {
    "schedule": {
        "cosine_without_half_pi": CosineWithoutHalfPi,
        "poly_wrong_exponent": PolyWithWrongExponent,
    },
    "process": {
        "masked_inverted_ratio": InvertedRatioMaskedProcess,
        "uniform_uncorrected_tweedie": UncorrectedTweedieUniformProcess,
        "uniform_joint_weighted": JointWeightedUniformProcess,
    },
    "objective": {
        "md4_self_target": SelfTargetELBO,
        "md4_mask_counting_reconstruction": MaskCountingReconstruction,
        "genmd4_without_decoder": GenMD4WithoutDecoder,
        "genmd4_without_rate_terms": GenMD4WithoutRateTerms,
        "md4_discrete_step_end": DiscreteELBOAtStepEnd,
        "d3pm_hybrid_in_bound": HybridInBound,
        "score_entropy_without_constant": ScoreEntropyWithoutConstant,
    },
    "sampler": {
        "ancestral_unnormalised": UnnormalisedAncestralSampler,
        "ancestral_ignoring_grid": GridIgnoringAncestralSampler,
        "top_p_off_by_one": OffByOneNucleusSampler,
        "euler_outgoing_rates": OutgoingRatesEulerSampler,
        "analytic_propagating": PropagatingAnalyticSampler,
        "tau_leaping_late_rates": LateRatesTauLeapingSampler,
        "first_hitting_linear_time": LinearTimeFirstHittingSampler,
        "genmd4_scalar_schedule": ScalarScheduleGenMD4Sampler,
        "ancestral_guidance_convention": GuidanceConventionSampler,
        "ancestral_late_infill": LateInfillSampler,
    },
}


@pytest.fixture(scope="module")
def registry():
    """The default registry with every mutant registered under its own name."""
    copy = ddiff.Registry()
    for entry in ddiff.default_registry():
        copy.register(entry.slot, entry.name, entry.cls)
    for slot, mutants in MUTANTS.items():
        for name, cls in mutants.items():
            copy.register(slot, name, cls)
    return copy


def _with(line, schedule=None, process=None):
    """A line's setup with its schedule or process kind replaced by a registered name."""
    spec = dict(line.process)
    if schedule is not None:
        spec["schedule"] = schedule
    if process is not None:
        spec["kind"] = process
    return dataclasses.replace(line, process=spec)


# (mutant, slot and registered name of the component run, the line it runs on, its own
# arguments, the check that rejects it). Schedule and process mutants run through a
# built-in objective or sampler on the line of that component with the mutant swapped in.
CASES = [
    ("md4_self_target", "objective", "md4_self_target", lines.MD4, {}, "bound_terms[table]"),
    ("md4_mask_counting_reconstruction", "objective", "md4_mask_counting_reconstruction", lines.MD4, {}, "bound_terms[table]"),
    ("genmd4_without_decoder", "objective", "genmd4_without_decoder", lines.GENMD4, {}, "bound_terms[table]"),
    ("genmd4_without_rate_terms", "objective", "genmd4_without_rate_terms", lines.GENMD4, {}, "bound_terms[table]"),
    ("md4_discrete_step_end", "objective", "md4_discrete_step_end", lines.MD4, {}, "bound_terms[table]"),
    ("d3pm_hybrid_in_bound", "objective", "d3pm_hybrid_in_bound", lines.D3PM_UNIFORM, {"hybrid_weight": 0.1}, "bound_terms[table]"),
    ("score_entropy_without_constant", "objective", "score_entropy_without_constant", lines.UNIFORM_SCORE, {}, "bound_terms[table]"),
    ("cosine_without_half_pi", "objective", "md4_elbo", _with(lines.ABSORBING_COSINE, schedule="cosine_without_half_pi"), {}, "bound_terms[table]"),
    ("poly_wrong_exponent", "objective", "campbell_elbo", _with(lines.CAMPBELL, schedule="poly_wrong_exponent"), {}, "bound_terms[table]"),
    ("masked_inverted_ratio", "objective", "score_entropy", _with(lines.ABSORBING, process="masked_inverted_ratio"), {}, "bound_terms[table]"),
    ("uniform_joint_weighted", "objective", "d3pm_vb", _with(lines.D3PM_UNIFORM, process="uniform_joint_weighted"), {"hybrid_weight": 0.01}, "bound_terms[table]"),
    ("ancestral_unnormalised", "sampler", "ancestral_unnormalised", lines.MD4, {"steps": 128}, "chain[none]"),
    ("ancestral_ignoring_grid", "sampler", "ancestral_ignoring_grid", lines.MD4, {"steps": 128, "grid": "cosine"}, "chain[none]"),
    ("top_p_off_by_one", "sampler", "top_p_off_by_one", lines.MD4, {"steps": 128, "top_p": 0.9}, "chain[none]"),
    ("euler_outgoing_rates", "sampler", "euler_outgoing_rates", lines.ABSORBING_COSINE, {"steps": 128}, "chain[none]"),
    ("analytic_propagating", "sampler", "analytic_propagating", lines.ABSORBING, {"steps": 128}, "chain[none]"),
    ("tau_leaping_late_rates", "sampler", "tau_leaping_late_rates", lines.CAMPBELL, {"steps": 128}, "chain[none]"),
    ("first_hitting_linear_time", "sampler", "first_hitting_linear_time", lines.MD4_COSINE, {}, "chain[none]"),
    ("genmd4_scalar_schedule", "sampler", "genmd4_scalar_schedule", lines.GENMD4, {"steps": 128}, "chain[none]"),
    ("ancestral_guidance_convention", "sampler", "ancestral_guidance_convention", lines.MD4, {"steps": 128}, "chain[labels+infill+guidance]"),
    ("ancestral_late_infill", "sampler", "ancestral_late_infill", lines.MD4, {"steps": 128}, "chain[labels+infill+guidance]"),
    ("masked_inverted_ratio", "sampler", "analytic", _with(lines.ABSORBING, process="masked_inverted_ratio"), {"steps": 128}, "chain[none]"),
    ("uniform_uncorrected_tweedie", "sampler", "analytic", _with(lines.UNIFORM, process="uniform_uncorrected_tweedie"), {"steps": 128}, "chain[none]"),
    ("uniform_joint_weighted", "sampler", "d3pm_ancestral", _with(lines.D3PM_UNIFORM, process="uniform_joint_weighted"), {"steps": 128}, "chain[none]"),
]  # fmt: skip

CONTROLS = [
    ("objective", "md4_elbo", lines.ABSORBING_COSINE, {}, "bound_terms[table]"),
    ("objective", "campbell_elbo", _with(lines.CAMPBELL, schedule="poly"), {}, "bound_terms[table]"),
    ("objective", "d3pm_vb", lines.D3PM_UNIFORM, {"hybrid_weight": 0.1}, "bound_terms[table]"),
    ("sampler", "ancestral", lines.MD4, {"steps": 128, "grid": "cosine"}, "chain[none]"),
    ("sampler", "top_p", lines.MD4, {"steps": 128, "top_p": 0.9}, "chain[none]"),
]
"""The checks of CASES that tests/test_conformance.py does not run on the built-in the
mutant was made from (every other case is a check of a line there)."""


def _run(registry, slot, name, line, arguments, check):
    setup = dataclasses.replace(line, registry=registry)
    if slot == "objective":
        return objective_checks(name, setup, **arguments)[check]()
    return sampler_checks(name, setup, **arguments)[check]()


@pytest.mark.parametrize("case", CASES, ids=[f"{mutant}-{name}" for mutant, _, name, *_ in CASES])
def test_the_kit_rejects_the_mutant(registry, case):
    mutant, slot, name, line, arguments, check = case
    result = _run(registry, slot, name, line, arguments, check)
    print(result)
    assert not result.passed, f"mutant {mutant!r} passed {check}: {result}"


@pytest.mark.parametrize("control", CONTROLS, ids=[f"{name}-{check}" for _, name, _, _, check in CONTROLS])
def test_the_built_ins_pass_the_same_checks(registry, control):
    result = _run(registry, *control)
    print(result)
    assert result.passed, result


def test_the_mutants_cover_every_family():
    rejected = {mutant for mutant, *_ in CASES}
    registered = {name for mutants in MUTANTS.values() for name in mutants}
    assert registered == rejected and len(registered) >= 15
