"""LLaDA's decoding as its generate.py does it: block alignment to the prompt, the
remainder-first count schedule, the drawn-token confidence rule at any temperature, random
remasking, prompt-masking guidance and EOS suppression, each against an exact answer: a
transcription of LLaDA's loop in numpy on a deterministic network (token for token), the
kit's exact chain law, or the law of the rule enumerated on a table model."""

import itertools
import math
from collections import defaultdict

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddiff
import ddiff.testing as kit
from ddiff_plugins import decoding

V = 7


class _HashNetwork(ddiff.AbstractNetwork):
    """Deterministic logits that depend on the position, the value and what is visible
    (h = sum over visible positions m of (x_m + 1)(m + 1)), so the decoding order matters
    and no two confidences tie."""

    time_conditioned: bool = eqx.field(static=True, default=False)
    num_classes: int = eqx.field(static=True, default=0)

    def __call__(self, x_t, t, *, label=None, key=None):
        positions = jnp.arange(x_t.shape[0], dtype=jnp.float32)
        visible = x_t != V
        h = jnp.sum(jnp.where(visible, (x_t + 1) * (positions + 1), 0.0))
        n, v = positions[:, None], jnp.arange(V, dtype=jnp.float32)[None, :]
        return 3.0 * jnp.sin(0.9 * n * v + 1.7 * v + 0.31 * h + 0.5 * n)


@pytest.fixture(scope="module")
def hash_model():
    return ddiff.DiffusionModel(
        network=_HashNetwork(),
        parameterization=ddiff.build_component("parameterization", "mean"),
        process=ddiff.build_component("process", {"kind": "masked", "schedule": "linear"}, vocab_size=V),
    )


def _softmax(logits):
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def llada_generate(
    network, prompt, gen_length, block_length, steps, cfg_scale=0.0, eos=None, eos_eot=None
):
    """LLaDA's generate() at temperature 0 with low-confidence remasking, transcribed: blocks
    from the prompt's end, get_num_transfer_tokens' remainder-first counts, the confidence
    softmax(logits) at the drawn token, cfg by masking the prompt, logits_eos_inf, and
    confidence_eos_eot_inf with ``eos_eot`` = (EOS, EoT): its chained assignment after the
    draw, the noisy logits being the logits themselves at temperature 0."""
    logits_of = jax.jit(lambda x: network(x, jnp.zeros(())))
    x = np.full(len(prompt) + gen_length, V)
    x[: len(prompt)] = prompt
    prompt_index = x != V
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    for block in range(num_blocks):
        end = len(prompt) + (block + 1) * block_length
        masked_in_block = int(np.sum(x[end - block_length : end] == V))
        base, remainder = divmod(masked_in_block, per_block)
        counts = [base + (i < remainder) for i in range(per_block)]
        for i in range(per_block):
            mask_index = x == V
            logits = np.asarray(logits_of(jnp.asarray(x)), np.float64)
            if cfg_scale > 0:
                unconditional = np.where(prompt_index, V, x)
                un_logits = np.asarray(logits_of(jnp.asarray(unconditional)), np.float64)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            if eos is not None:
                logits[:, eos] = -np.inf
            logits_with_noise = logits
            x0 = np.argmax(logits_with_noise, axis=-1)
            if eos_eot is not None:
                logits_with_noise[:, eos_eot[0]] = logits[:, eos_eot[1]] = -np.inf
            x0_p = _softmax(logits)[np.arange(len(x)), x0]
            x0_p[end:] = -np.inf
            confidence = np.where(mask_index, x0_p, -np.inf)
            chosen = np.argsort(-confidence, kind="stable")[: counts[i]]
            x[chosen] = x0[chosen]
    return x


def _decode(model, sampler, prompt, seq_len, batch=2):
    given = np.zeros((batch, seq_len), bool)
    given[:, : len(prompt)] = True
    tokens = np.zeros((batch, seq_len), np.int32)
    tokens[:, : len(prompt)] = prompt
    conditioning = ddiff.Conditioning(fixed_tokens=jnp.asarray(tokens), fixed_mask=jnp.asarray(given))
    keys = ddiff.sample_keys(jax.random.PRNGKey(0), 0, batch)
    output = eqx.filter_jit(lambda s, m, k, c: s.sample(m, keys=k, seq_len=seq_len, conditioning=c))(
        sampler, model, keys, conditioning
    )
    return np.asarray(output.tokens), int(output.num_function_evals)


def _llada(block_length, steps_per_block, **options):
    inner = {
        "kind": "confidence", "steps": steps_per_block, "schedule": options.pop("schedule", "remainder_first"),
        "confidence": "drawn_prob", "greedy": True, "transforms": options.pop("transforms", []),
        "confidence_suppress_tokens": options.pop("confidence_suppress_tokens", []),
    }
    return ddiff.build_component("sampler", {"kind": "semi_ar", "block_length": block_length, "inner": inner, **options})


PROMPT = np.asarray([3, 1, 4, 1, 5])


def test_blocks_begin_at_the_end_of_the_prompt(hash_model):
    """Prompt 5, blocks of 4, 12 generated tokens, 2 steps per block: semi_ar (blocks from
    the prompt's end by default) equals LLaDA's decoding token for token, with 2 calls per
    block; blocks counted from position 0 (``align: start``) decode something else."""
    reference = llada_generate(hash_model.network, PROMPT, 12, 4, 6)
    tokens, calls = _decode(hash_model, _llada(4, 2), PROMPT, 17)
    assert (tokens == reference).all(), (tokens[0].tolist(), reference.tolist())
    assert calls == 6
    explicit, _ = _decode(hash_model, _llada(4, 2, align="prompt"), PROMPT, 17)
    assert (explicit == reference).all()
    from_start, _ = _decode(hash_model, _llada(4, 2, align="start"), PROMPT, 17)
    assert (from_start != reference).any()


def test_remainder_first_counts_are_llada_s(hash_model):
    """16 masked positions over 6 steps per block: remainder_first unmasks 3, 3, 3, 3, 2, 2
    as get_num_transfer_tokens does and equals LLaDA's decoding (2 blocks of 16 after a
    prompt of 5); the linear schedule's 3, 3, 2, 3, 3, 2 decodes something else."""
    reference = llada_generate(hash_model.network, PROMPT, 32, 16, 12)
    tokens, calls = _decode(hash_model, _llada(16, 6), PROMPT, 37)
    assert (tokens == reference).all() and calls == 12
    linear, _ = _decode(hash_model, _llada(16, 6, schedule="linear"), PROMPT, 37)
    assert (linear != reference).any()


def test_prompt_masking_guidance_and_eos_suppression_are_llada_s(hash_model):
    """cfg_scale 1.5 (the unconditional logits with the prompt masked, two calls per step)
    and logits_eos_inf for token 2: equal to LLaDA's decoding token for token, no 2 drawn;
    without them the decoding differs."""
    reference = llada_generate(hash_model.network, PROMPT, 8, 4, 4, cfg_scale=1.5, eos=2)
    sampler = _llada(4, 2, prompt_guidance=1.5, transforms=[{"kind": "suppress_tokens", "tokens": [2]}])
    tokens, calls = _decode(hash_model, sampler, PROMPT, 13)
    assert (tokens == reference).all(), (tokens[0].tolist(), reference.tolist())
    assert calls == 2 * 4 and not (tokens[:, 5:] == 2).any()
    plain, _ = _decode(hash_model, _llada(4, 2), PROMPT, 13)
    assert (plain != reference).any()


def test_confidence_eos_eot_inf_is_llada_s(hash_model):
    """confidence_eos_eot_inf with EOS 0 and EoT 1 at temperature 0 (where LLaDA's noisy
    logits are its logits, so its chained assignment removes both from the confidence's
    softmax, after the draw): ``confidence_suppress_tokens: [0, 1]`` equals LLaDA's
    decoding token for token (prompt 5, blocks of 4, 2 steps each), three drawn 0s and 1s
    among the 12 (confidence 0, decoded last in their block); without the option, or with
    EoT alone, the decoding differs."""
    reference = llada_generate(hash_model.network, PROMPT, 12, 4, 6, eos_eot=(0, 1))
    tokens, calls = _decode(hash_model, _llada(4, 2, confidence_suppress_tokens=[0, 1]), PROMPT, 17)
    assert (tokens == reference).all(), (tokens[0].tolist(), reference.tolist())
    assert calls == 6 and np.isin(reference[5:], [0, 1]).sum() == 3
    for other in ([], [1]):
        decoded, _ = _decode(hash_model, _llada(4, 2, confidence_suppress_tokens=other), PROMPT, 17)
        assert (decoded != reference).any(), other


def test_meaningless_combinations_are_one_line(hash_model):
    for options in ({"align": "prompt"}, {"prompt_guidance": 1.0}):
        sampler = _llada(4, 2, **options)
        keys = ddiff.sample_keys(jax.random.PRNGKey(0), 0, 2)
        with pytest.raises(ddiff.RecipeError, match=next(iter(options))) as error:
            sampler.sample(hash_model, keys=keys, seq_len=8, conditioning=ddiff.Conditioning())
        assert "\n" not in str(error.value) and "prompt" in str(error.value)
    with pytest.raises(ddiff.RecipeError, match="temperature"):
        ddiff.build_component("sampler", {"kind": "confidence", "greedy": True, "temperature": 0.5})
    with pytest.raises(ddiff.RecipeError, match="confidence"):
        ddiff.build_component("sampler", {"kind": "threshold", "confidence": "random"})
    with pytest.raises(ddiff.RecipeError, match="confidence_suppress_tokens") as error:
        ddiff.build_component(
            "sampler", {"kind": "confidence", "confidence": "random", "confidence_suppress_tokens": [2]}
        )
    assert "\n" not in str(error.value)


def test_suppress_tokens_renormalises_and_keeps_one_hot_rows():
    rows = jnp.log(jnp.asarray([[0.5, 0.3, 0.2], [0.0, 0.0, 1.0]]))
    out = np.exp(np.asarray(decoding.SuppressTokens(tokens=(2,))(rows)))
    np.testing.assert_allclose(out, [[0.625, 0.375, 0.0], [0.0, 0.0, 1.0]], atol=1e-6)


# --------------------------------------------------------------------------- laws

SMALL_V, SMALL_D = 3, 3


@pytest.fixture(scope="module")
def table():
    process = ddiff.build_component("process", {"kind": "masked", "schedule": "linear"}, vocab_size=SMALL_V)
    mean = ddiff.build_component("parameterization", "mean")
    model = kit.table_model(process, mean, SMALL_D, seed=3, time_conditioned=False)
    states = np.asarray(list(itertools.product(range(SMALL_V + 1), repeat=SMALL_D)), np.int32)
    log_means = np.asarray(jax.vmap(lambda x: model.log_mean(x, jnp.zeros(())))(jnp.asarray(states)), np.float64)
    return model, {tuple(s): lm for s, lm in zip(states.tolist(), log_means, strict=True)}


def rule_law(log_mean_of, counts, rule, temperature):
    """The exact law of a confidence decoder from all-mask: at each step every masked
    position draws v from mu^(1/temperature) (normalised), and the ``counts[i]``
    positions of highest confidence (mu[v] for drawn_prob, max mu for max_prob; every
    subset equally for random) take their draws."""
    law = {(SMALL_V,) * SMALL_D: 1.0}
    for count in counts:
        after = defaultdict(float)
        for x, weight in law.items():
            masked = [n for n in range(SMALL_D) if x[n] == SMALL_V]
            mu = np.exp(log_mean_of[x])
            draw = mu ** (1.0 / temperature)
            draw /= draw.sum(axis=-1, keepdims=True)
            for values in itertools.product(range(SMALL_V), repeat=len(masked)):
                p = weight * math.prod(draw[n, v] for n, v in zip(masked, values, strict=True))
                if rule == "random":
                    subsets = list(itertools.combinations(range(len(masked)), count))
                else:
                    score = [mu[n, v] if rule == "drawn_prob" else mu[n].max() for n, v in zip(masked, values, strict=True)]
                    subsets = [tuple(np.argsort(-np.asarray(score), kind="stable")[:count])]
                for subset in subsets:
                    y = list(x)
                    for j in subset:
                        y[masked[j]] = values[j]
                    after[tuple(y)] += p / len(subsets)
        law = after
    cells = np.zeros(SMALL_V**SMALL_D)
    for x, weight in law.items():
        cells[int(np.dot(x, SMALL_V ** np.arange(SMALL_D - 1, -1, -1)))] += weight
    return cells


def _empirical(sampler, model, num, seed):
    keys = ddiff.sample_keys(jax.random.PRNGKey(seed), 0, num)
    output = eqx.filter_jit(lambda s, m, k: s.sample(m, keys=k, seq_len=SMALL_D, conditioning=ddiff.Conditioning()))(
        sampler, model, keys
    )
    index = np.asarray(output.tokens) @ (SMALL_V ** np.arange(SMALL_D - 1, -1, -1))
    return np.bincount(index, minlength=SMALL_V**SMALL_D)


@pytest.mark.parametrize(
    ("rule", "temperature"), [("drawn_prob", 1.0), ("drawn_prob", 0.5), ("random", 1.0)]
)
def test_stochastic_rules_follow_their_enumerated_law(table, rule, temperature):
    """Two positions then one (2 linear steps for 3 positions) on a random time-independent
    table model: 2^13 samples pass a chi-square test (false alarm 1e-3) against the rule's
    law enumerated exactly; at temperature 1 LLaDA's drawn-token rule is a different law
    from ranking by the largest probability (TV > 0.05, which 2^13 samples resolve; at
    0.5 both laws put 0.85 on one sequence)."""
    model, log_mean_of = table
    sampler = ddiff.build_component(
        "sampler", {"kind": "confidence", "steps": 2, "schedule": "linear", "confidence": rule, "temperature": temperature}
    )
    law = rule_law(log_mean_of, [2, 1], rule, temperature)
    test = kit.chi_square_test(_empirical(sampler, model, 2**13, 7), law)
    assert test["p_value"] >= 1e-3 and test["impossible"] == 0, test
    if rule == "drawn_prob" and temperature == 1.0:
        other = rule_law(log_mean_of, [2, 1], "max_prob", temperature)
        assert 0.5 * np.abs(law - other).sum() > 0.05


def test_random_remasking_one_per_step_is_the_random_order_chain():
    """LLaDA's random remasking, one position per step (4 steps for D = 4), values drawn:
    the kit's exact law of drawing the masked positions one at a time in uniformly random
    order (first hitting's chain for a time-independent model), with given positions,
    2^12 samples, chi-square at false alarm 1e-3."""
    process = ddiff.build_component("process", {"kind": "masked", "schedule": "linear"}, vocab_size=3)
    mean = ddiff.build_component("parameterization", "mean")
    model = kit.table_model(process, mean, 4, seed=5, time_conditioned=False)
    sampler = ddiff.build_component("sampler", {"kind": "confidence", "steps": 4, "schedule": "remainder_first", "confidence": "random"})
    chain = ddiff.ReverseChain(step="continuous", reads="mean", times=(1.0, 0.0), final="sequential")
    result = kit.check_reverse_chain(
        sampler, model, kit.markov_toy(3, 4), key=jax.random.PRNGKey(2), conditioning="infill",
        num_samples=2**12, chain=chain,
    )
    assert result.passed, result
