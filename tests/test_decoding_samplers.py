"""The all-mask start and the decoding samplers' defining properties (their exact settings
run through the conformance kit in test_conformance.py)."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ddiff_plugins import decoding

import ddiff
import ddiff.runner
import ddiff.testing as kit

V, D = 3, 4


def build(slot, spec, **context):
    return ddiff.build_component(slot, spec, vocab_size=V, seq_len=D, **context)


@pytest.fixture(scope="module")
def toys():
    process = build("process", {"kind": "masked", "schedule": "linear"})
    mean = build("parameterization", "mean")
    toys = {**kit.toy_distributions(V, D), "classes": kit.class_conditional_toy(V, D)}
    return {name: (kit.oracle_model(toy, process, mean), toy) for name, toy in toys.items()}


@eqx.filter_jit
def run(sampler, model, key, conditioning, num_samples):
    keys = ddiff.sample_keys(key, 0, num_samples)
    return sampler.sample(model, keys=keys, seq_len=D, conditioning=conditioning)


COUNTING_V = 5


class _CountingNetwork(ddiff.AbstractNetwork):
    """Predicts, at every position and almost surely, the number of visible positions
    (mod COUNTING_V = 5 > D): the decoding order can be read off the samples."""

    time_conditioned: bool = eqx.field(static=True, default=False)
    num_classes: int = eqx.field(static=True, default=0)

    def __call__(self, x_t, t, *, label=None, key=None):
        visible = jnp.sum(x_t != COUNTING_V)
        return 40.0 * jax.nn.one_hot(jnp.full(x_t.shape, visible % COUNTING_V), COUNTING_V)


@pytest.fixture(scope="module")
def counting_model():
    return ddiff.DiffusionModel(
        network=_CountingNetwork(),
        parameterization=ddiff.build_component("parameterization", "mean"),
        process=ddiff.build_component("process", {"kind": "masked", "schedule": "linear"}, vocab_size=COUNTING_V),
    )



# --------------------------------------------------------------------------- the start


@eqx.filter_jit
def _start(process, key, conditioning, count, seq_len):
    keys = ddiff.sample_keys(key, 0, count)
    return ddiff.initial_tokens(process, keys=keys, seq_len=seq_len, conditioning=conditioning)


@pytest.mark.parametrize(
    ("schedule", "alpha_1"), [({"kind": "linear"}, 1e-4), ({"kind": "loglinear"}, 1e-3)]
)
def test_masked_processes_start_from_all_mask_and_the_prior_draw_is_measured(schedule, alpha_1):
    """The prior draw puts a uniform token at each position with probability alpha_1; over
    2^10 sequences of 1024 positions the fraction holding at least one matches
    1 - (1 - alpha_1)^1024 (MD4 linear 9.7%, SEDD log-linear 64.1%) within 5 standard
    errors, and the default start holds none."""
    process = ddiff.build_component("process", {"kind": "masked", "schedule": schedule}, vocab_size=16)
    assert float(process.schedule.alpha(jnp.ones(()))) == pytest.approx(alpha_1, rel=1e-3)
    key, count = jax.random.PRNGKey(0), 2**10
    default = np.asarray(_start(process, key, ddiff.Conditioning(), count, 1024))
    assert np.all(default == 16)
    prior = np.asarray(_start(process, key, ddiff.Conditioning(start_from_prior=True), count, 1024))
    touched = np.mean(np.any(prior != 16, axis=1))
    expected = 1.0 - (1.0 - alpha_1) ** 1024
    assert abs(touched - expected) <= 5 * math.sqrt(expected * (1 - expected) / count), (touched, expected)


def test_other_processes_start_from_their_prior_and_given_positions_are_set():
    uniform = ddiff.build_component("process", {"kind": "uniform", "schedule": "linear"}, vocab_size=V)
    given = ddiff.Conditioning(
        fixed_tokens=jnp.full((256, D), 2, jnp.int32), fixed_mask=jnp.asarray([[True, False, False, False]] * 256)
    )
    tokens = np.asarray(_start(uniform, jax.random.PRNGKey(1), given, 256, D))
    assert np.all(tokens[:, 0] == 2) and set(np.unique(tokens[:, 1:])) == {0, 1, 2}
    masked = ddiff.build_component("process", {"kind": "masked", "schedule": "linear"}, vocab_size=V)
    tokens = np.asarray(_start(masked, jax.random.PRNGKey(1), given, 256, D))
    assert np.all(tokens[:, 0] == 2) and np.all(tokens[:, 1:] == V)
    assert np.array_equal(
        ddiff.still_masked(given, jnp.asarray(tokens), V), np.asarray(tokens) == V
    )
    held = ddiff.Conditioning(fixed_tokens=jnp.full((1, D), V, jnp.int32), fixed_mask=jnp.asarray([[False, False, True, True]]))
    assert ddiff.still_masked(held, jnp.full((1, D), V, jnp.int32), V).tolist() == [[True, True, False, False]]


# --------------------------------------------------------------------------- confidence, threshold


def test_confidence_measures_and_count_schedules():
    log_mean = jnp.log(jnp.asarray([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]]))
    np.testing.assert_allclose(decoding.confidence(log_mean, "max_prob"), [0.5, 1.0])
    np.testing.assert_allclose(decoding.confidence(log_mean, "margin"), [0.2, 1.0], atol=1e-6)
    entropy = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    np.testing.assert_allclose(decoding.confidence(log_mean, "neg_entropy"), [-entropy, 0.0], atol=1e-6)
    done = jnp.asarray([0.0, 0.5, 1.0])
    np.testing.assert_allclose(decoding.remaining_fraction("linear", done), [1.0, 0.5, 0.0])
    np.testing.assert_allclose(decoding.remaining_fraction("cosine", done), [1.0, math.sqrt(0.5), 0.0], atol=1e-6)


def _decoded_per_step(kind, steps, total):
    """The confidence and p2 decoders' recurrence: positions unmasked at each step
    (at least one while any is left), from ``total`` to decode, one row per total."""
    left = np.asarray(total).copy()
    per_step = []
    for i in range(1, steps + 1):
        after = np.asarray(decoding.masked_count(kind, steps, jnp.asarray(total), jnp.int32(i)))
        unmask = np.where(left > 0, np.clip(left - after, 1, left), 0)
        per_step.append(unmask)
        left = left - unmask
    return np.stack(per_step, axis=1), left


def test_unmasking_counts_follow_the_schedule_exactly():
    """For every 1 <= T <= M <= 64 (2080 pairs): the counts sum to M; with the linear
    schedule exactly floor(M (T - i) / T) positions (integer arithmetic) stay masked after
    step i, so T = M unmasks one position per step; the cosine counts equal
    floor(M cos(pi/2 i/T)) computed in float64 (1/2 exactly at i = 2T/3). Float32
    fractions put 92 of the 528 pairs with T <= M <= 32 one below (M = T = 3 gave [2, 1, 0])."""
    for steps in range(1, 65):
        total = np.arange(steps, 65, dtype=np.int32)
        for kind in ("linear", "cosine"):
            per_step, left = _decoded_per_step(kind, steps, total)
            assert (per_step.sum(axis=1) == total).all() and (left == 0).all()
            for i in range(1, steps + 1):
                counted = np.asarray(decoding.masked_count(kind, steps, jnp.asarray(total), jnp.int32(i)))
                if kind == "linear":
                    exact = (total.astype(np.int64) * (steps - i)) // steps
                else:
                    fraction = 0.5 if 3 * i == 2 * steps else math.cos(0.5 * math.pi * i / steps)
                    exact = np.floor(total * (0.0 if i == steps else fraction)).astype(np.int64)
                assert (counted == exact).all(), (kind, steps, i)
        linear, _ = _decoded_per_step("linear", steps, np.asarray([steps], np.int32))
        assert (linear == 1).all()


def test_one_position_per_call_at_as_many_steps_as_positions(counting_model):
    """T = M = 4: confidence decoding makes 4 network calls, one position each."""
    sampler = build("sampler", {"kind": "confidence", "steps": D, "schedule": "linear"})
    output = run(sampler, counting_model, jax.random.PRNGKey(0), ddiff.Conditioning(), 2)
    assert int(output.num_function_evals) == D


def test_highest_breaks_ties_uniformly():
    """Two of four equal scores (and one higher): the higher one always, the others equally
    often, 2^12 draws, within 5 standard errors."""
    scores = jnp.asarray([0.0, 1.0, 0.0, 0.0])
    keys = jax.random.split(jax.random.PRNGKey(0), 2**12)
    chosen = np.asarray(jax.vmap(lambda k: decoding.highest(k, scores, 2))(keys))
    assert np.all(chosen.sum(axis=1) == 2) and np.all(chosen[:, 1])
    frequency = chosen[:, [0, 2, 3]].mean(axis=0)
    assert np.all(np.abs(frequency - 1 / 3) <= 5 * math.sqrt(2 / 9 / 2**12)), frequency


def test_threshold_selection_unmasks_exactly_the_positions_above_the_threshold():
    key = jax.random.PRNGKey(0)
    scores = jnp.asarray([0.95, 0.5, 0.99, 0.91, 0.2])
    candidates = jnp.asarray([True, True, False, True, True])
    chosen = decoding.threshold_selection(key, scores, candidates, 0.9)
    assert chosen.tolist() == [True, False, False, True, False]
    fallback = decoding.threshold_selection(key, scores, candidates, 0.96)
    assert fallback.tolist() == [True, False, False, False, False]  # the best candidate only
    assert not decoding.threshold_selection(key, scores, jnp.zeros(5, bool), 0.5).any()


def test_threshold_decoder_takes_one_step_plus_one_per_position_below_the_threshold(toys):
    """On the independent toy mu at a position is its marginal whatever else is revealed,
    so the first step unmasks the A positions whose largest marginal exceeds the threshold
    and each later step one of the B = D - A others: 1 + B network evaluations."""
    model, toy = toys["independent"]
    probs = toy.probabilities().reshape((V,) * D)
    top = np.asarray([np.max(probs.sum(axis=tuple(a for a in range(D) if a != n))) for n in range(D)])
    threshold = float(np.sort(top)[1] + np.sort(top)[2]) / 2  # two above, two below
    sampler = build("sampler", {"kind": "threshold", "threshold": threshold, "greedy": True})
    output = run(sampler, model, jax.random.PRNGKey(0), ddiff.Conditioning(), 16)
    assert int(output.num_function_evals) == 1 + int(np.sum(top <= threshold)) == 3
    marginal_modes = [int(np.argmax(probs.sum(axis=tuple(a for a in range(D) if a != n)))) for n in range(D)]
    assert np.all(np.asarray(output.tokens) == marginal_modes)  # greedy: each position's mode


def test_confidence_decoder_follows_its_count_schedule_and_skips_empty_steps(toys):
    """8 linear steps for 4 positions leave 3, 3, 2, 2, 1, 1, 0, 0 masked: four steps unmask
    one position each and the other four make no network call."""
    model, _ = toys["markov"]
    sampler = build("sampler", {"kind": "confidence", "steps": 8, "schedule": "linear"})
    output = run(sampler, model, jax.random.PRNGKey(0), ddiff.Conditioning(), 8)
    assert int(output.num_function_evals) == 4
    assert np.asarray(output.tokens).max() < V


# --------------------------------------------------------------------------- ReMDM


def test_remdm_step_keeps_every_marginal_and_is_ancestral_without_remasking():
    """For alpha_s > alpha_t and 0 <= sigma <= sigma_max the step's probabilities are a
    distribution, a decoded token is remasked with probability sigma, and the masked
    probability of a position after the step is 1 - alpha_s when it was 1 - alpha_t
    before (Wang et al. 2025, Prop. 1)."""
    log_mean = jnp.log(jnp.asarray([[0.2, 0.5, 0.3], [0.2, 0.5, 0.3]]))
    x = jnp.asarray([V, 1])
    for alpha_t, alpha_s in ((0.3, 0.5), (0.9, 0.9), (1e-4, 0.01)):
        sigma_max = min(1.0, (1 - alpha_s) / alpha_t)
        for sigma in (0.0, 0.5 * sigma_max, sigma_max):
            probs = np.exp(np.asarray(decoding.remdm_logits(log_mean, x, V, alpha_s, alpha_t, sigma), np.float64))
            np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)
            assert probs[1, V] == pytest.approx(sigma, abs=1e-6)
            masked_after = (1 - alpha_t) * probs[0, V] + alpha_t * probs[1, V]
            assert masked_after == pytest.approx(1 - alpha_s, abs=1e-5)


@pytest.fixture(scope="module")
def transformer_model():
    process = build("process", {"kind": "masked", "schedule": "cosine"})
    network = ddiff.build_component(
        "network", {"kind": "transformer", "dim": 16, "depth": 1, "heads": 2}
    ).build(num_states=V + 1, num_outputs=V, seq_len=D, num_classes=2, key=jax.random.PRNGKey(0))
    return ddiff.DiffusionModel(network=network, parameterization=build("parameterization", "mean"), process=process)


def test_remdm_without_remasking_is_ancestral_bit_for_bit(transformer_model):
    """Same keys, a time-conditioned network, labels, guidance and given positions: eta = 0
    (sigma = 0, as under ``rescale``) gives ancestral's tokens and evaluations exactly."""
    conditioning = ddiff.Conditioning(
        labels=jnp.arange(32, dtype=jnp.int32) % 2,
        fixed_tokens=jnp.full((32, D), 1, jnp.int32),
        fixed_mask=jnp.asarray([[False, True, False, False]] * 32),
        guidance=1.0,
    )
    key = jax.random.PRNGKey(3)
    reference = run(build("sampler", {"kind": "ancestral", "steps": 16}), transformer_model, key, conditioning, 32)
    remdm = build("sampler", {"kind": "remdm", "steps": 16, "strategy": "cap", "eta": 0.0})
    output = run(remdm, transformer_model, key, conditioning, 32)
    np.testing.assert_array_equal(output.tokens, reference.tokens)
    assert int(output.num_function_evals) == int(reference.num_function_evals)


def test_remdm_redraws_decoded_tokens(counting_model):
    """With the counting network a token's value is the number of visible positions when it
    was drawn, so without remasking the values of a sample add up to at most 0+1+2+3 = 6
    (positions decoded together share a smaller count). The loop schedule with eta = 0 never
    exceeds it; with eta = 0.5 (sigma = 1/9 per step while alpha is held at 0.9) decoded
    tokens are remasked and redrawn later, with more visible: most of 256 samples exceed it."""
    totals = {}
    for eta in (0.0, 0.5):
        sampler = build("sampler", {"kind": "remdm", "steps": 64, "strategy": "loop", "eta": eta})
        output = run(sampler, counting_model, jax.random.PRNGKey(4), ddiff.Conditioning(), 256)
        totals[eta] = np.asarray(output.tokens).sum(axis=1)
    assert totals[0.0].max() <= 6
    assert np.mean(totals[0.5] > 6) > 0.5, np.bincount(totals[0.5])


# --------------------------------------------------------------------------- P2, blocks


class _RightToLeft(decoding.AbstractPathPlanningSampler):
    """A planner (the hook) that keeps the leftmost masked positions masked: decoding runs
    right to left, one position per step; it reports one network evaluation per step."""

    steps: int = eqx.field(static=True, default=D)
    schedule: decoding.CountSchedule = eqx.field(static=True, default="linear")

    def planner_scores(self, model, x, proposal, log_mean, recorded, masked, conditioning, *, keys):
        positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.float32), x.shape)
        return jnp.where(masked, positions, 1e9), jnp.int32(1)


def test_p2_follows_its_planner(counting_model):
    """Position 3 is decoded first (0 visible), then 2, 1, 0: the values read 3, 2, 1, 0;
    the planner's evaluations are counted."""
    output = run(_RightToLeft(), counting_model, jax.random.PRNGKey(5), ddiff.Conditioning(), 8)
    assert np.asarray(output.tokens).tolist() == [[3, 2, 1, 0]] * 8
    assert int(output.num_function_evals) == 2 * D


def test_semi_ar_checks_its_inner_sampler_and_round_trips_in_a_recipe():
    raw = {
        "data": {"kind": "toy", "toy": "markov", "num_train": 8, "num_eval": 8},
        "process": {"kind": "masked", "schedule": "linear"},
        "parameterization": "mean",
        "network": {"kind": "transformer", "dim": 8, "depth": 1, "heads": 2},
        "objective": "md4_elbo",
        "sampler": {"kind": "semi_ar", "block_length": 2, "inner": {"kind": "confidence", "steps": 2}},
    }
    recipe = ddiff.runner.build_recipe(raw, source="blocks.yaml")
    assert isinstance(recipe.sampler.inner, decoding.ConfidenceSampler)
    again = ddiff.runner.build_recipe(ddiff.runner.recipe.parse_yaml(recipe.to_yaml(), "x"), source="x")
    assert again.resolved == recipe.resolved
    wrong = {**raw, "sampler": {"kind": "semi_ar", "inner": {"kind": "left_to_right"}}}
    with pytest.raises(ddiff.IncompatibleComponentsError, match="inner sampler") as error:
        ddiff.runner.build_recipe(wrong, source="blocks.yaml")
    assert "left_to_right" in str(error.value) and "\n" not in str(error.value)


def test_semi_ar_decodes_block_by_block(toys):
    """Blocks of one position with an inner sampler that decodes a block from one
    prediction: left-to-right decoding, exact on parity (2^10 samples, no impossible
    sequence), one inner call per block."""
    model, toy = toys["parity"]
    sampler = build("sampler", {"kind": "semi_ar", "block_length": 1, "inner": {"kind": "confidence", "steps": 1}})
    result = kit.check_sampler(sampler, model, toy, key=jax.random.PRNGKey(6), num_samples=2**10)
    assert result.passed and result.numbers["impossible"] == 0, result
    assert result.numbers["num_function_evals"] == D
