"""Block diffusion (BD3-LM): the identities of the block bound by exact enumeration on
V = 3, D = 4 (81 sequences, 16 mask patterns), the vectorised block-causal pass against
block-by-block calls, and the block sampler (cached = uncached, variable length).

The exact references enumerate every mask pattern of a block: for a network that ignores
t and the linear schedule without clipping (eps = 0: alpha_0 = 1, alpha_1 = 0, so no
reconstruction or prior term), a block of L' positions whose subset S is masked carries the
weight int_0^1 (1/t) t^|S| (1-t)^(L'-|S|) dt = (|S|-1)! (L'-|S|)! / L'!, so

    bound(x) = sum_b sum_{S in b, S nonempty} w(|S|) sum_{n in S} -log mu(x with S masked)[n, x^n],

and the block model's exact likelihood is the average over the L'! unmasking orders of a
block of the product of mu at each reveal (the continuous-time reverse process of a
time-independent mu unmasks the positions in a uniformly random order).
"""

import itertools
import json
import math
import re
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddiff
from ddiff.runner import build_recipe, load_recipe, main
from ddiff.testing import Setup, toy_distributions
from ddiff_plugins.networks import MD4Transformer

V, D = 3, 4
PATTERNS = np.array(list(itertools.product([False, True], repeat=D)))
SEQUENCES = np.array(list(itertools.product(range(V), repeat=D)), np.int32)
REGISTRY = ddiff.default_registry()


def _network(attention: str = "auto", depth: int = 1) -> MD4Transformer:
    """A tiny time-independent MD4 transformer with every parameter perturbed (the
    zero-initialised head and modulations would make every output uniform)."""
    network = MD4Transformer(
        num_states=V + 1, num_outputs=V, seq_len=D, key=jax.random.key(0), dim=16, depth=depth,
        heads=2, cond_dim=8, time_conditioned=False, attention=attention,
    )  # fmt: skip
    params, static = eqx.partition(network, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [a + 0.5 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    return eqx.combine(jax.tree.unflatten(treedef, noisy), static)


def _model(network, eps: float = 0.0, compute_dtype=None) -> ddiff.DiffusionModel:
    process = ddiff.build_component(
        "process", {"kind": "masked", "schedule": {"kind": "linear", "eps": eps}}, vocab_size=V, registry=REGISTRY
    )
    parameterization = ddiff.build_component("parameterization", "mean", registry=REGISTRY)
    return ddiff.DiffusionModel(
        network=network, parameterization=parameterization, process=process, compute_dtype=compute_dtype
    )


@pytest.fixture(scope="module")
def model():
    return _model(_network())


@pytest.fixture(scope="module")
def oracle():
    setup = Setup(process={"kind": "masked", "schedule": {"kind": "linear", "eps": 0.0}})
    toy = toy_distributions(V, D)["markov"]
    return setup.oracle(toy), toy


@eqx.filter_jit
def _pattern_cross_entropies(model, block_size):
    """-log mu[n, x^n] for every sequence x, mask pattern and position, read through the
    vectorised pass with blocks of ``block_size`` (None: the bidirectional network)."""

    def one(x0):
        def pattern(masked):
            x_t = jnp.where(masked, V, x0)
            if block_size is None:
                log_mean = model.log_mean(x_t, jnp.zeros(()))
            else:
                log_mean = model.block_causal_log_mean(x_t, x0, block_size=block_size)
            return -jnp.take_along_axis(log_mean, x0[:, None], axis=-1)[:, 0]

        return jax.vmap(pattern)(jnp.asarray(PATTERNS))

    return jax.vmap(one)(jnp.asarray(SEQUENCES))


def _index(positions) -> int:
    """The row of PATTERNS that masks exactly ``positions``."""
    return sum(2 ** (D - 1 - n) for n in positions)


def _weight(size: int, block_size: int, interval: tuple[float, float]) -> float:
    """The mean over t in the interval of (1/t) t^size (1-t)^(block_size-size): the weight
    of a pattern of ``size`` masked positions (over [0, 1], (size-1)! (L'-size)! / L'!)."""
    poly = np.polynomial.polynomial
    integral = poly.polyint(poly.polymul(poly.polypow([0, 1], size - 1), poly.polypow([1, -1], block_size - size)))
    low, high = interval
    return (poly.polyval(high, integral) - poly.polyval(low, integral)) / (high - low)


def exact_bound_and_nll(model, block_size, bidirectional=False, interval=(0.0, 1.0)):
    """(bound, nll) per sequence, in nats, by enumeration (module docstring); with an
    ``interval`` of times other than [0, 1], the clipped objective instead of the bound."""
    ce = np.asarray(_pattern_cross_entropies(model, None if bidirectional else block_size), np.float64)
    bound = np.zeros(len(SEQUENCES))
    nll = np.zeros(len(SEQUENCES))
    for start in range(0, D, block_size):
        block = range(start, start + block_size)
        for size in range(1, block_size + 1):
            weight = _weight(size, block_size, interval)
            for subset in itertools.combinations(block, size):
                bound += weight * sum(ce[:, _index(subset), n] for n in subset)
        likelihood = np.zeros(len(SEQUENCES))
        for order in itertools.permutations(block):
            log_product = sum(ce[:, _index(order[i:]), order[i]] for i in range(block_size))
            likelihood += np.exp(-log_product) / math.factorial(block_size)
        nll -= np.log(likelihood)
    return bound, nll


def _objective(block_size, **arguments):
    spec = {"kind": "bd3lm_elbo", "block_size": block_size, **arguments}
    return ddiff.build_component("objective", spec, seq_len=D, registry=REGISTRY)


@eqx.filter_jit
def _per_example(objective, model, x0, key, train=False):
    return objective.per_example_terms(model, x0, key=key, train=train)


# --------------------------------------------------------------------------- the bound


def test_whole_sequence_block_is_the_md4_elbo(model):
    """L' = D: the bound equals MD4's ELBO per sequence, exactly (enumeration, against the
    bidirectional network) and per draw (the same keys give the same times and masks:
    equal to float32 rounding, 1e-5 relative)."""
    bound, _ = exact_bound_and_nll(model, D)
    md4, _ = exact_bound_and_nll(model, D, bidirectional=True)
    np.testing.assert_allclose(bound, md4, rtol=1e-6)
    md4_objective = ddiff.build_component("objective", "md4_elbo", registry=REGISTRY)
    ours, theirs = _same_draws(_objective(D), md4_objective, model, jnp.asarray(SEQUENCES), jax.random.key(4))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5)


@eqx.filter_jit
def _same_draws(first, second, model, x0, key):
    return tuple(o.per_example_terms(model, x0, key=key, train=False).nelbo for o in (first, second))


@eqx.filter_jit
def _causal_nll(model, x0):
    """-sum_n log p(x^n | x^{<n}) read block by block through the cache (blocks of 1)."""
    prefix = model.init_prefix(D - 1, block_size=1)
    total = jnp.zeros(())
    for n in range(D):
        log_mean = model.log_mean(jnp.full((1,), V), jnp.zeros(()), prefix=prefix)
        total = total - log_mean[0, x0[n]]
        if n < D - 1:
            prefix = model.extend_prefix(prefix, x0[n : n + 1])
    return total


def test_one_token_blocks_are_the_autoregressive_nll(model):
    """L' = 1: the bound is the autoregressive NLL of the same network read causally (one
    call per position with a cache of the clean prefix), and so is the exact likelihood;
    the objective computes it exactly, with no Monte Carlo noise (1e-5 relative)."""
    causal = np.asarray(jax.vmap(lambda x: _causal_nll(model, x))(jnp.asarray(SEQUENCES)), np.float64)
    bound, nll = exact_bound_and_nll(model, 1)
    np.testing.assert_allclose(bound, causal, rtol=1e-5)
    np.testing.assert_allclose(nll, causal, rtol=1e-5)
    terms = _per_example(_objective(1), model, jnp.asarray(SEQUENCES), jax.random.key(0), train=True)
    np.testing.assert_allclose(np.asarray(terms.nelbo), causal, rtol=1e-5)
    assert float(jnp.max(terms.metrics["block_loss_variance"])) > 0


def test_the_bound_is_above_the_exact_nll_and_tight_with_the_oracle(model, oracle):
    """For L' = 2 and 4 the bound is at least the block model's exact NLL for every
    sequence, and strictly above on average (L' = 1: equal, the test above); with the
    exact block conditionals of the toy it equals -log p(x) for every sequence, at
    L' = 1, 2 and 4 (1e-4 nats)."""
    for block_size in (2, 4):
        bound, nll = exact_bound_and_nll(model, block_size)
        assert np.all(bound >= nll - 1e-5) and np.mean(bound - nll) > 1e-3
    oracle_model, toy = oracle
    log_p = np.asarray(toy.sequence_log_probs(), np.float64)
    possible = np.isfinite(log_p)
    for block_size in (1, 2, 4):
        bound, nll = exact_bound_and_nll(oracle_model, block_size)
        np.testing.assert_allclose(bound[possible], -log_p[possible], atol=1e-4)
        np.testing.assert_allclose(nll[possible], -log_p[possible], atol=1e-4)


def test_the_estimator_is_unbiased_and_clipping_only_trains(model):
    """L' = 2 (two blocks, two times per sequence), 64 draws per sequence: the one-pass
    estimate's mean matches the enumerated bound, and with t clipped to [0.5, 1] in
    training it matches the enumerated clipped objective (the bound's integrand averaged
    over [0.5, 1]), within 4 standard errors each; evaluated (train=False), the clipped
    objective gives the unclipped estimates bit for bit."""
    x0 = jnp.asarray(np.repeat(SEQUENCES, 64, axis=0))
    key = jax.random.key(7)
    clipped = _objective(2, clip=(0.5, 1.0))
    cases = ((_objective(2), False, (0.0, 1.0)), (clipped, True, (0.5, 1.0)))
    for objective, train, interval in cases:
        exact, _ = exact_bound_and_nll(model, 2, interval=interval)
        estimates = np.asarray(_per_example(objective, model, x0, key, train).nelbo, np.float64)
        difference = estimates - np.repeat(exact, 64)
        error = difference.std(ddof=1) / math.sqrt(len(difference))
        assert abs(difference.mean()) < 4 * error, (train, difference.mean(), error)
        if not train:
            unclipped = estimates
    np.testing.assert_array_equal(np.asarray(_per_example(clipped, model, x0, key).nelbo, np.float64), unclipped)


# --------------------------------------------------------------------------- the network


@eqx.filter_jit
def _vectorised_and_by_block(model, x_t, x0, block_size):
    full = model.block_causal_log_mean(x_t, x0, block_size=block_size)
    rows = {True: [], False: []}
    for cached in rows:
        prefix = model.init_prefix(D - block_size, block_size=block_size, cached=cached)
        for start in range(0, D, block_size):
            block = slice(start, start + block_size)
            rows[cached].append(model.log_mean(x_t[block], jnp.zeros(()), prefix=prefix))
            if start + block_size < D:
                prefix = model.extend_prefix(prefix, x0[block])
    return full, jnp.concatenate(rows[True]), jnp.concatenate(rows[False])


@eqx.filter_jit
def _both_kinds(fused, written, x_t, x0):
    return tuple(n.block_causal_output(x_t, x0, block_size=2) for n in (fused, written))


def test_vectorised_pass_equals_block_by_block(model):
    """The one-pass block-causal output (L' = 2) equals one call per block, with the
    key-value cache and with the recomputed prefix, in float32 (1e-5) and under bfloat16
    compute (5e-2: bfloat16 rounds to 2^-8 per operation); the two attention kinds agree
    on the masked pass (1e-5). (L' = 1 and L' = D: the exact identities above.)"""
    block_size = 2
    x0 = jnp.asarray([2, 0, 1, 1])
    x_t = jnp.asarray([V, 0, V, V])
    for compute_dtype, tolerance in ((None, 1e-5), ("bfloat16", 5e-2)):
        full, cached, uncached = _vectorised_and_by_block(
            _model(model.network, compute_dtype=compute_dtype), x_t, x0, block_size
        )
        finite = jnp.isfinite(full)
        assert jnp.array_equal(finite, jnp.isfinite(cached)) and jnp.array_equal(finite, jnp.isfinite(uncached))
        for other in (cached, uncached):
            assert jnp.allclose(jnp.where(finite, full, 0), jnp.where(finite, other, 0), atol=tolerance)
    fused, written = _both_kinds(_network("dot_product_attention"), _network("einsum"), x_t, x0)
    assert jnp.allclose(fused, written, atol=1e-5)


def test_the_mask_is_block_diagonal_offset_block_causal_and_block_causal():
    mask = ddiff.nn.block_causal_mask(4, 2).astype(int)
    expected = [
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ]
    np.testing.assert_array_equal(mask, expected)


# --------------------------------------------------------------------------- the sampler


def _sampler(**arguments):
    spec = {"kind": "bd3lm", "block_size": 2, **arguments}
    return ddiff.build_component("sampler", spec, seq_len=D, registry=REGISTRY)


@eqx.filter_jit
def _sample(sampler, model, keys, seq_len):
    return sampler.sample(model, keys=keys, seq_len=seq_len, conditioning=ddiff.Conditioning())


def test_cached_sampling_equals_uncached_and_stops_at_the_end_token():
    """Sampling three times the training length (past D a block sees the last D - L'
    positions before it, and the cache is rebuilt from them) with a stop token, with a
    network of two layers (the second layer's cached keys depend on the prefix): the
    key-value cache gives bit for bit the tokens of the recomputed prefix; every sample
    ends at its first stop token (or at the length asked for) and holds PAD_TOKEN after
    it; and a sample is the same whatever the other samples of its batch are. With L' = D
    (a window of no clean positions past D) the two agree too."""
    model = _model(_network(depth=2))
    inner = {"kind": "ancestral", "steps": 4}
    keys = ddiff.sample_keys(jax.random.key(5), 0, 32)
    cached = _sample(_sampler(inner=inner, stop_token=1), model, keys, 3 * D)
    uncached = _sample(_sampler(inner=inner, stop_token=1, kv_cache=False), model, keys, 3 * D)
    tokens, lengths = np.asarray(cached.tokens), np.asarray(cached.lengths)
    np.testing.assert_array_equal(tokens, np.asarray(uncached.tokens))
    np.testing.assert_array_equal(lengths, np.asarray(uncached.lengths))
    assert int(cached.num_function_evals) > int(uncached.num_function_evals)
    assert len(set(lengths.tolist())) > 2 and max(lengths) > D, lengths
    for row, length in zip(tokens, lengths, strict=True):
        assert np.all(row[length:] == ddiff.PAD_TOKEN) and np.all(row[:length] >= 0)
        stops = np.flatnonzero(row[:length] == 1)
        assert (length == 3 * D and len(stops) == 0) or list(stops) == [length - 1]
    whole = [_sample(_sampler(block_size=D, inner=inner, kv_cache=cached), model, keys[:8], 2 * D) for cached in (True, False)]
    np.testing.assert_array_equal(np.asarray(whole[0].tokens), np.asarray(whole[1].tokens))
    others = keys.at[5:].set(ddiff.sample_keys(jax.random.key(6), 5, 27))
    again = np.asarray(_sample(_sampler(inner=inner, stop_token=1), model, others, 3 * D).tokens)
    np.testing.assert_array_equal(again[:5], tokens[:5])
    assert (again[5:] != tokens[5:]).any()


def test_block_sizes_and_inner_samplers_are_checked_when_loading():
    raw = {
        "data": {"kind": "toy", "toy": "markov", "num_train": 8, "num_eval": 8},
        "process": {"kind": "masked", "schedule": "linear"},
        "parameterization": "mean",
        "network": {"kind": "md4_transformer", "dim": 8, "depth": 1, "heads": 2, "cond_dim": 8, "time_conditioned": False},
        "objective": {"kind": "bd3lm_elbo", "block_size": 2},
        "sampler": {"kind": "bd3lm", "block_size": 2, "inner": "ancestral"},
    }

    def error(**changes):
        with pytest.raises(ddiff.RecipeError) as info:
            build_model_of({**raw, **changes})
        return str(info.value)

    def build_model_of(mapping):
        recipe = build_recipe(mapping, source="b.yaml", registry=REGISTRY)
        return ddiff.runner.build_model(recipe, jax.random.key(0))

    assert "objective.block_size: 3 does not divide" in error(objective={"kind": "bd3lm_elbo", "block_size": 3})
    message = error(sampler={"kind": "bd3lm", "block_size": 4, "inner": "ancestral"})
    assert "samples blocks of 4 tokens but objective 'bd3lm_elbo' trains blocks of 2" in message
    network = {**raw["network"], "time_conditioned": True}
    assert "needs capability block_causal, time_independent" in error(network=network)
    uniform = ddiff.build_component("process", {"kind": "uniform", "schedule": "linear"}, vocab_size=V, registry=REGISTRY)
    mean = ddiff.build_component("parameterization", "mean", registry=REGISTRY)
    problem = _sampler(inner="ancestral").pairing_problem({"process": ("uniform", uniform), "parameterization": ("mean", mean)})
    assert problem.startswith("its inner sampler: sampler 'AncestralSampler' cannot be used with process 'uniform'")


# --------------------------------------------------------------------------- runs and recipes


def test_sample_beyond_the_training_length_from_the_command_line(tmp_path, capsys):
    """A bd3lm run of the toy source trained one step; ``ddiff sample --max-length``
    twice its length writes variable-length samples: text rows of their lengths, .npy
    rows padded with -1, and the lengths in the .json."""
    workdir = tmp_path / "run"
    overrides = [
        "data={kind: toy, toy: markov, num_train: 16, num_eval: 8}",
        "network.dim=8", "network.depth=1", "network.heads=2", "network.cond_dim=8",
        "objective.block_size=2", "sampler.block_size=2", "sampler.stop_token=0",
        "sampler.inner={kind: ancestral, steps: 2}", "trainer.steps=1", "trainer.batch_size=8",
        "trainer.num_samples=0", "trainer.final_eval=false", "trainer.eval_every=0", "mesh.data=1",
    ]  # fmt: skip
    assert main(["run", "recipes/bd3lm_quickstart.yaml", *overrides, "--workdir", str(workdir)]) == 0
    assert main(["sample", str(workdir), "--num", "16", "--max-length", "8", "--steps", "3", "--name", "long"]) == 0
    out = capsys.readouterr().out
    stats = json.loads((workdir / "samples" / "long.json").read_text())
    tokens = np.load(workdir / "samples" / "long.npy")
    lines = (workdir / "samples" / "long.txt").read_text().splitlines()
    assert tokens.shape == (16, 8) and len(stats["lengths"]) == 16 and re.search(r"lengths \d+\.\.\d+\)", out)
    for row, length, line in zip(tokens, stats["lengths"], lines, strict=True):
        assert np.all(row[length:] == -1) and len(line.split()) == length
    assert main(["sample", str(workdir), "--max-length", "7"]) == 2
    assert "multiple of 2" in capsys.readouterr().err


def test_max_length_needs_a_variable_length_sampler(tiny_recipe):
    from ddiff.runner.sample_options import SampleOptions, sample_length

    with pytest.raises(ddiff.RecipeError, match="--max-length needs a sampler that stops"):
        sample_length(SampleOptions(max_length=64), tiny_recipe)


@pytest.mark.parametrize(("name", "block_size"), [("bd3lm_openwebtext_l4", 4), ("bd3lm_openwebtext_l8", 8), ("bd3lm_openwebtext_l16", 16), ("bd3lm_lm1b", 4)])
def test_paper_recipes_open_with_the_paper_numbers(name, block_size):
    path = Path("recipes") / f"{name}.yaml"
    header = path.read_text().split("\n\n")[0]
    assert header.startswith("# BD3-LM") and "Paper:" in header
    recipe = load_recipe(path)
    assert recipe.objective.block_size == recipe.sampler.block_size == block_size
