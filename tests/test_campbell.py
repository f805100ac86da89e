"""Campbell et al.'s CTMC bound and tau-leaping against independent computations: the
estimator's expectation against the path KL enumerated in another form, its mean against
MD4's ELBO on the masked process (with its larger spread near the optimum), the exact law
of one leap, and the samplers' bookkeeping.

The conformance kit (tests/test_conformance.py) checks the bound's tightness with the
oracle, the entropy bound and, for the samplers, their output distribution."""

import itertools
import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ddiff_plugins import campbell

import ddiff
import ddiff.runner
import ddiff.testing as kit

V, D = 3, 4
PROCESSES = {
    "masked": ({"kind": "masked", "schedule": "linear"}, "mean"),
    "uniform": ({"kind": "uniform", "schedule": "cosine"}, "x0"),
}


def build(slot, spec):
    return ddiff.build_component(slot, spec, vocab_size=V, seq_len=D)


@pytest.fixture(scope="module")
def toys():
    return kit.toy_distributions(V, D)


@eqx.filter_jit
def _terms_at(objective, model, x0, t, keys):
    return jax.vmap(lambda k: objective.example_terms(model, x0, t, key=k, train=False))(keys)


@eqx.filter_jit
def _path_kl_integrand(model, x0, t):
    """E_{x ~ q_t(.|x_0)} sum_n sum_{y != x^n} [B - A + A log(A / B)] by enumerating every
    x: A = R_t(y -> x^n) q_t(y | x_0^n) / q_t(x^n | x_0^n) the rates of the reversal given
    x_0, B = R_t(y -> x^n) s_theta(x)[n, y] the model's, both read at x itself (SEDD's
    denoising score entropy form of the same path KL; no jump is drawn)."""
    process = model.process
    states = jnp.asarray(list(itertools.product(range(process.num_states), repeat=D)))
    q = process.marginal_probs(x0, t)  # (seq, states)

    def at(x):
        weight = jnp.prod(q[jnp.arange(D), x])
        incoming = process.incoming_rates(x, t)
        model_rates = campbell.reverse_rates(process, model.log_mean(x, t), x, t)
        ratio = q / q[jnp.arange(D), x][:, None]
        true_rates = jnp.where(jax.nn.one_hot(x, process.num_states, dtype=bool), 0.0, incoming * ratio)
        log_term = jnp.where(
            true_rates > 0,
            true_rates * (jnp.log(jnp.where(true_rates > 0, true_rates, 1.0)) - jnp.log(jnp.where(true_rates > 0, model_rates, 1.0))),
            0.0,
        )
        return jnp.where(weight > 0, weight * jnp.sum(model_rates - true_rates + log_term), 0.0)

    return jnp.sum(jax.vmap(at)(states))


@pytest.mark.parametrize("name", list(PROCESSES))
def test_expected_integrand_is_the_enumerated_path_kl(toys, name):
    """For one x_0 and fixed t in {0.3, 0.85}, the mean of the bound's diffusion term over
    2^13 draws of (x_t, x~) with a wrong model (the dense toy's exact denoiser, for data
    that are not from it) equals the path-KL integrand computed by enumerating x_t in the
    other (score entropy) form, within 4 standard errors: the jump, its weight Z_t(x_t),
    the -1 and the conditional rates all enter correctly."""
    process_spec, parameterization = PROCESSES[name]
    process = build("process", process_spec)
    model = kit.oracle_model(toys["dense"], process, build("parameterization", parameterization))
    objective = build("objective", "campbell_elbo")
    x0 = jnp.array([0, 2, 1, 1])
    for index, t in enumerate((0.3, 0.85)):
        t = jnp.asarray(t)
        keys = jax.random.split(jax.random.PRNGKey(10 + index), 2**13)
        diffusion = np.asarray(_terms_at(objective, model, x0, t, keys).metrics["diffusion"], np.float64)
        exact = float(_path_kl_integrand(model, x0, t))
        error = diffusion.std() / math.sqrt(len(diffusion))
        assert abs(diffusion.mean() - exact) <= 4 * error, (name, float(t), diffusion.mean(), exact, error)
        assert exact > 0


@eqx.filter_jit
def _terms(objective, model, x0, key):
    return objective.per_example_terms(model, x0, key=key, train=False)


def test_masked_bound_equals_md4_elbo_with_a_larger_spread_near_the_optimum(toys):
    """Masked process, linear schedule, 2^14 draws of the markov toy shared by both
    objectives (same times and keys). For the dense toy's exact denoiser (a deliberately
    wrong model) and the markov toy's (the optimum), mean(campbell) - mean(md4) is within
    4 standard errors of the paired difference (measured at 2^16: +0.001 ± 0.035 and
    -0.003 ± 0.027 nats; for the untrained network of the conformance kit +0.002 ± 0.027).
    At the optimum the Campbell estimator's per-example standard deviation is larger
    (measured 5.71 vs 4.08 nats, ratio 1.40; required here > 1.2); far from it, it need not
    be (wrong model: 5.63 vs 7.74; untrained: 4.91 vs 4.88): MD4 weights every masked
    position's cross-entropy by alpha'/(1 - alpha), Campbell's one jumped position by Z_t,
    and adds a model-free count term whose fluctuation remains however good the model is
    (docs/campbell.md)."""
    process = build("process", {"kind": "masked", "schedule": "linear"})
    mean = build("parameterization", "mean")
    models = {
        "wrong": kit.oracle_model(toys["dense"], process, mean),
        "oracle": kit.oracle_model(toys["markov"], process, mean),
    }
    x0, _ = toys["markov"].sample(jax.random.PRNGKey(1), 2**14)
    md4, bound = build("objective", "md4_elbo"), build("objective", "campbell_elbo")
    spreads = {}
    for name, model in models.items():
        reference = np.asarray(_terms(md4, model, x0, jax.random.PRNGKey(2)).nelbo, np.float64)
        values = np.asarray(_terms(bound, model, x0, jax.random.PRNGKey(2)).nelbo, np.float64)
        difference = values - reference
        error = difference.std() / math.sqrt(len(difference))
        assert abs(difference.mean()) <= 4 * error, (name, difference.mean(), error)
        spreads[name] = values.std() / reference.std()
    assert spreads["oracle"] > 1.2, spreads


def test_one_leap_follows_the_exact_rule():
    """Positions with total rates lambda/tau in {0, 0.3, 1.5, 40} (tau = 1): over 2^15
    leaps, each outcome's frequency (stay, or move to y with probability
    lambda e^-lambda r_y / sum r) is within 5 binomial standard errors."""
    rates = jnp.array([[0.0, 0.0, 0.0, 0.0], [0.0, 0.1, 0.2, 0.0], [1.0, 0.0, 0.0, 0.5], [10.0, 10.0, 20.0, 0.0]])
    x = jnp.array([0, 0, 1, 3])
    draws = jax.vmap(lambda k: campbell._leap(k, x, rates, jnp.asarray(1.0)))(jax.random.split(jax.random.PRNGKey(0), 2**15))
    draws = np.asarray(draws)
    total = np.asarray(rates).sum(-1)
    for n in range(4):
        move = total[n] * np.exp(-total[n])
        expected = np.where(total[n] > 0, move * np.asarray(rates[n]) / max(total[n], 1e-30), 0.0)
        expected[int(x[n])] = 1.0 - move
        observed = np.bincount(draws[:, n], minlength=4) / len(draws)
        se = np.sqrt(np.maximum(expected * (1 - expected), 1e-12) / len(draws))
        assert np.all(np.abs(observed - expected) <= 5 * se + 1e-12), (n, observed, expected)


def test_terms_and_the_auxiliary_cross_entropy(toys):
    """nelbo = diffusion + reconstruction + prior; nll_weight adds w * cross_entropy to the
    loss and leaves nelbo unchanged (same key); with the mean parameterization the
    reconstruction is 0 wherever no position is masked at t = 0 (2^14 markov draws, the
    exact denoiser)."""
    process = build("process", {"kind": "masked", "schedule": "linear"})
    model = kit.oracle_model(toys["markov"], process, build("parameterization", "mean"))
    x0, _ = toys["markov"].sample(jax.random.PRNGKey(1), 2**14)
    plain = _terms(build("objective", "campbell_elbo"), model, x0, jax.random.PRNGKey(2))
    weighted = _terms(build("objective", {"kind": "campbell_elbo", "nll_weight": 0.5}), model, x0, jax.random.PRNGKey(2))
    metrics = plain.metrics
    np.testing.assert_allclose(plain.nelbo, metrics["diffusion"] + metrics["reconstruction"] + metrics["prior"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(plain.loss, plain.nelbo)
    np.testing.assert_allclose(weighted.nelbo, plain.nelbo, rtol=1e-6)
    np.testing.assert_allclose(weighted.loss, plain.nelbo + 0.5 * metrics["cross_entropy"], rtol=1e-5, atol=1e-4)
    assert np.all(np.asarray(metrics["cross_entropy"]) >= 0) and float(np.max(metrics["cross_entropy"])) > 0
    assert float(np.median(metrics["reconstruction"])) == 0.0


def test_corrector_calls_and_given_positions(toys):
    """8 leaps on the uniform grid with correctors from t <= 0.5: the leaps end at
    s = 0.5, 0.375, 0.25, 0.125 (and 0, where none runs), so 2 corrector steps each add 8
    calls to the 8 leaps and the final draw; guidance doubles every call. Given positions
    are kept."""
    toy = kit.class_conditional_toy(V, D)
    process = build("process", {"kind": "uniform", "schedule": "linear"})
    model = kit.oracle_model(toy, process, build("parameterization", "x0"))
    sampler = build(
        "sampler",
        {"kind": "tau_leaping_pc", "steps": 8, "corrector_steps": 2, "corrector_entry_time": 0.5},
    )
    fixed = jnp.tile(jnp.array([[2, 0, 0, 1]]), (16, 1))
    mask = jnp.tile(jnp.array([[True, False, False, True]]), (16, 1))
    conditioning = ddiff.Conditioning(labels=jnp.zeros(16, jnp.int32), fixed_tokens=fixed, fixed_mask=mask, guidance=1.0)
    keys = ddiff.sample_keys(jax.random.PRNGKey(0), 0, 16)
    output = sampler.sample(model, keys=keys, seq_len=D, conditioning=conditioning)
    assert int(output.num_function_evals) == 2 * (8 + 8 + 1)
    tokens = np.asarray(output.tokens)
    assert np.all(tokens[:, [0, 3]] == [2, 1]) and tokens.min() >= 0 and tokens.max() < V


@pytest.mark.parametrize(
    ("slot", "spec", "message"),
    [
        ("objective", {"kind": "campbell_elbo", "nll_weight": -1.0}, "objective.nll_weight: nll_weight must be >= 0"),
        ("sampler", {"kind": "tau_leaping", "steps": 0}, "sampler.steps: steps must be >= 1"),
        ("sampler", {"kind": "tau_leaping_pc", "corrector_steps": 0}, "sampler.corrector_steps: corrector_steps must be >= 1"),
        ("sampler", {"kind": "tau_leaping_pc", "corrector_entry_time": 2.0}, "sampler.corrector_entry_time: must be in [0, 1]"),
    ],
)
def test_bad_arguments_are_one_line(slot, spec, message):
    with pytest.raises(ddiff.RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build(slot, spec)


@pytest.mark.slow
def test_text8_recipe_runs_two_steps(tmp_path, capsys):
    """recipes/campbell_text8.yaml for 2 steps on a small text8 file in the real format,
    shrunk by overrides as tests/test_paper_recipes.py does: it trains, evaluates the bound
    and writes tau-leaping samples of letters and spaces."""
    from data_fixtures import write_text8

    from ddiff.runner import main

    write_text8(tmp_path / "data", characters=4000)
    text = open("recipes/campbell_text8.yaml").read()
    assert text.startswith("# Campbell et al.") and "Paper:" in text.split("\n\n")[0]
    workdir = tmp_path / "run"
    shrink = [
        f"data.root={tmp_path / 'data'}", "data.length=32", "trainer.steps=2", "trainer.batch_size=2",
        "trainer.log_every=1", "trainer.checkpoint_every=2", "trainer.num_samples=4", "sampler.steps=2",
        "eval.batch_size=4", "eval.time_draws=1", "mesh.data=1", "network.dim=32", "network.depth=2",
        "network.heads=4", "network.cond_dim=16",
    ]  # fmt: skip
    code = main(["run", "recipes/campbell_text8.yaml", *shrink, "--workdir", str(workdir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "campbell_elbo with masked process" in out and "(V=27, D=32)" in out
    result = json.loads((workdir / "eval.json").read_text())
    assert 3.0 < result["bits_per_char"] < 9.0
    samples = (workdir / "samples" / "step_00000002.txt").read_text().splitlines()
    assert len(samples) == 4 and all(len(s) == 32 and set(s) <= set("abcdefghijklmnopqrstuvwxyz ") for s in samples)


def test_a_per_value_schedule_is_refused_at_load_time(tiny_overrides):
    """GenMD4's per-value schedule (alpha_0 = 1, alpha rounding to 1 at small t) would
    overflow the reverse rates; the recipe is refused with one line."""
    overrides = (*tiny_overrides, "process.schedule={kind: learnable_poly}", "objective.kind=campbell_elbo", "sampler.kind=tau_leaping")
    with pytest.raises(ddiff.IncompatibleComponentsError, match="needs capability scalar_schedule"):
        ddiff.runner.load_recipe("recipes/quickstart.yaml", overrides)
