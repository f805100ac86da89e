"""BD3-LM sampling as its code samples (kuleshov-group/bd3lms, diffusion.py): the nucleus
that drops the token crossing p, first-hitting with that nucleus inside blocks, the forced
BOS and the entropy stop, each against a hand-computed answer on a network whose output
is a fixed table per position."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import Array, Float

import ddiff

V, D, L = 3, 16, 4


class _TableByPosition(ddiff.AbstractBlockCausalNetwork):
    """Block-causal in the trivial way: the output at position n is ``logits[n]``, whatever
    the tokens (its cache is the token window, :class:`ddiff.BlockPrefix`)."""

    logits: Float[Array, "seq vocab"]
    time_conditioned: bool = eqx.field(static=True, default=False)
    num_classes: int = eqx.field(static=True, default=0)

    def __call__(self, x_t, t, *, label=None, key=None):
        return self.logits[: x_t.shape[0]]

    def block_causal_output(self, x_t, x0, *, block_size, label=None, key=None):
        return self.logits[: x_t.shape[0]]

    def init_cache(self, capacity, *, block_size):
        return ddiff.BlockPrefix.empty(capacity, block_size)

    def extend_cache(self, cache, block, *, label=None):
        return cache.extend(block)

    def cached_output(self, x_t, cache, *, label=None):
        return jax.lax.dynamic_slice_in_dim(self.logits, cache.length, x_t.shape[0])


def _model(logits):
    return ddiff.DiffusionModel(
        network=_TableByPosition(logits=jnp.asarray(logits, jnp.float32)),
        parameterization=ddiff.build_component("parameterization", "mean"),
        process=ddiff.build_component("process", {"kind": "masked", "schedule": "linear"}, vocab_size=V),
    )


def _sample(model, num=8, **options):
    nucleus = options.pop("nucleus", {"top_p": 0.6, "crossing": "drop"})
    inner = {"kind": "first_hitting", "transforms": [{"kind": "top_p", **nucleus}]}
    sampler = ddiff.build_component(
        "sampler", {"kind": "bd3lm", "block_size": L, "inner": inner, **options}, vocab_size=V, seq_len=D
    )
    keys = ddiff.sample_keys(jax.random.PRNGKey(0), 0, num)
    run = eqx.filter_jit(lambda s, m, k: s.sample(m, keys=k, seq_len=D, conditioning=ddiff.Conditioning()))
    output = run(sampler, model, keys)
    lengths = None if output.lengths is None else np.asarray(output.lengths)
    return np.asarray(output.tokens), lengths


def bd3lm_nucleus(probs, p):
    """bd3lms' _nucleus_sample, transcribed: sorted descending, keep where the cumulative
    mass is <= p, always the first, renormalise."""
    order = np.argsort(-probs, axis=-1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=-1)
    keep = np.cumsum(ranked, axis=-1) <= p
    keep[..., 0] = True
    kept = np.zeros_like(probs)
    np.put_along_axis(kept, order, ranked * keep, axis=-1)
    return kept / kept.sum(axis=-1, keepdims=True)


def test_the_nucleus_drops_or_keeps_the_crossing_token():
    """256 random rows of 12 values, p = 0.7: ``crossing: drop`` keeps exactly the support
    of bd3lms' rule (probabilities to 1e-5); ``keep`` keeps exactly one value more in
    every row where the most probable value has less than p (which both keep), the one
    whose cumulative mass crosses p."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(12, 0.5), size=256)
    log_probs = jnp.log(jnp.asarray(probs, jnp.float32))
    dropped = np.exp(np.asarray(ddiff.TopP(top_p=0.7, crossing="drop")(log_probs), np.float64))
    np.testing.assert_allclose(dropped, bd3lm_nucleus(probs, 0.7), atol=1e-5)
    kept = np.exp(np.asarray(ddiff.TopP(top_p=0.7)(log_probs)))
    extra = (kept > 0) & ~(dropped > 0)
    below = probs.max(axis=1) < 0.7
    assert ((dropped > 0) <= (kept > 0)).all() and (extra.sum(axis=1) == below).all() and below.sum() > 200
    order = np.argsort(-probs, axis=1)
    crossing = order[np.arange(256), np.argmax(np.cumsum(np.take_along_axis(probs, order, 1), 1) > 0.7, axis=1)]
    assert (np.argmax(extra, axis=1) == crossing)[below].all()
    assert ddiff.TopP(top_p=0.7, crossing="drop").as_top_p() is None


def test_first_hitting_with_the_nucleus_in_blocks_and_a_forced_bos():
    """mu = (0.5, 0.3, 0.2) everywhere, p = 0.6, BOS = stop token = 2: with BD3-LM's nucleus
    only value 0 survives, so every sample is exactly [2, 0, 0, ..., 0] at full length (the
    forced BOS is no stop); the kept crossing token (value 1) appears otherwise."""
    model = _model(np.log(np.tile([0.5, 0.3, 0.2], (D, 1))))
    tokens, lengths = _sample(model, bos_token=2, stop_token=2)
    assert (tokens == [2] + [0] * (D - 1)).all() and (lengths == D).all()
    kept, _ = _sample(model, bos_token=2, nucleus={"top_p": 0.6})
    assert (kept[:, 0] == 2).all() and (kept[:, 1:] == 1).any() and not (kept[:, 1:] == 2).any()


def test_the_entropy_stop_truncates_as_bd3lm_does():
    """Window W = 8, threshold 1 nat. Value 0 everywhere: after the block ending at 12 > W
    the last 8 tokens have entropy 0, so the sample is cut to 12 - 8 = 4 tokens, the rest
    -1. Value n mod 3 at position n: every window of 8 holds counts 3, 3, 2 (entropy
    1.082 nats), so no sample stops."""
    flat = _model(np.log(np.tile([1.0, 1e-9, 1e-9], (D, 1))))
    tokens, lengths = _sample(flat, bos_token=2, entropy_window=8, entropy_threshold=1.0)
    assert (lengths == 4).all() and (tokens == [2, 0, 0, 0] + [ddiff.PAD_TOKEN] * (D - 4)).all()
    cycling = _model(40.0 * np.eye(V)[np.arange(D) % V])
    tokens, lengths = _sample(cycling, entropy_window=8, entropy_threshold=1.0)
    assert (lengths == D).all() and (tokens == np.arange(D) % V).all()


def test_meaningless_sampling_options_are_one_line():
    with pytest.raises(ddiff.RecipeError, match="entropy_window") as error:
        _sample(_model(np.zeros((D, V))), entropy_window=2)
    assert "\n" not in str(error.value) and "block" in str(error.value)
    with pytest.raises(ddiff.RecipeError, match="top_p"):
        ddiff.TopP(top_p=1.5, crossing="drop")


# --------------------------------------------------------------------------- training


def test_resampled_masks_follow_their_enumerated_law():
    """L' = 4, clip [0.3, 0.8], t ~ U[0.3, 0.8] per block (alpha = 1 - t): BD3-LM's
    resampling accepts masked counts 2 and 3 only, P(k = 2) = (1/0.5) int 3(1 - t)/(3 - t) dt
    = 3 - 12 ln(27/22) = 0.5425, each k-subset equally likely: 2^14 blocks pass a
    chi-square test over the 16 patterns (false alarm 1e-3). Drawn independently, counts
    0, 1 and 4 occur too."""
    from ddiff_plugins.bd3lm import block_keep

    count = 2**14
    times = jax.random.uniform(jax.random.PRNGKey(1), (count,), minval=0.3, maxval=0.8)
    keep = np.asarray(block_keep(jax.random.PRNGKey(2), 1.0 - times, 4, (0.3, 0.8))).reshape(count, 4)
    p2 = 3.0 - 12.0 * np.log(27.0 / 22.0)
    patterns = np.asarray(list(np.ndindex(2, 2, 2, 2)), bool)
    masked = (~patterns).sum(axis=1)
    law = np.where(masked == 2, p2 / 6, np.where(masked == 3, (1 - p2) / 4, 0.0))
    observed = np.bincount(keep @ (2 ** np.arange(3, -1, -1)), minlength=16)
    test = ddiff.testing.chi_square_test(observed, law)
    assert test["p_value"] >= 1e-3 and test["impossible"] == 0, test
    free = np.asarray(block_keep(jax.random.PRNGKey(2), 1.0 - times, 4, None)).reshape(count, 4)
    assert set(np.unique(4 - free.sum(axis=1))) == {0, 1, 2, 3, 4}


def _objective(**options):
    return ddiff.build_component(
        "objective", {"kind": "bd3lm_elbo", "block_size": D, **options}, vocab_size=V, seq_len=D
    )


def _eps_free_model(logits):
    model = _model(logits)
    process = ddiff.build_component("process", {"kind": "masked", "schedule": {"kind": "linear", "eps": 0.0}}, vocab_size=V)
    return eqx.tree_at(lambda m: m.process, model, process)


def test_weight_rule_eval_interval_and_bos_as_bd3lm_trains():
    """One block of 16, linear schedule without eps (weight -1/t), a table network:
    ``weight_rule: bd3lm`` with clip [0.6, 0.9] makes the weight -1, so the bound's loss
    is the rule's divided by t = 0.6 + 0.3 t_example (1e-5); evaluation over
    ``eval_interval`` equals training over the same clip, bit for bit; with ``ignore_bos``
    position 0 adds nothing: equal to a network certain of x^0 there."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(D, V))
    model = _eps_free_model(logits)
    x0 = jnp.asarray(rng.integers(0, V, D), jnp.int32)
    key, t = jax.random.PRNGKey(3), jnp.asarray(0.4)
    clip = {"clip": [0.6, 0.9]}
    bound = _objective(**clip).example_terms(model, x0, t, key=key).loss
    rule = _objective(**clip, weight_rule="bd3lm").example_terms(model, x0, t, key=key).loss
    np.testing.assert_allclose(float(bound), float(rule) / (0.6 + 0.3 * 0.4), rtol=1e-5)
    evaluated = _objective(eval_interval=[1e-3, 1.0]).example_terms(model, x0, t, key=key, train=False)
    trained = _objective(clip=[1e-3, 1.0]).example_terms(model, x0, t, key=key, train=True)
    assert float(evaluated.nelbo) == float(trained.nelbo)
    certain = logits.copy()
    certain[0] = -40.0
    certain[0, int(x0[0])] = 40.0
    ignoring = _objective(ignore_bos=True).example_terms(model, x0, jnp.asarray(0.9), key=key).loss
    kept = _objective().example_terms(_eps_free_model(certain), x0, jnp.asarray(0.9), key=key).loss
    plain = _objective().example_terms(model, x0, jnp.asarray(0.9), key=key).loss
    np.testing.assert_allclose(float(ignoring), float(kept), rtol=1e-6)
    assert abs(float(plain) - float(ignoring)) > 1e-3  # position 0 is masked in this draw


def test_token_mean_loss_is_bd3lm_s_scale():
    """``loss_reduction: token_mean``: the batch's loss is the mean over its 4 x 16 tokens of
    the per-token terms, the sequence loss of every example divided by D = 16 (1e-6), and so
    is its gradient (what ``grad_clip`` reads); ``nelbo`` is unchanged, bit for bit."""
    rng = np.random.default_rng(1)
    model = _eps_free_model(rng.normal(size=(D, V)))
    x0 = jnp.asarray(rng.integers(0, V, (4, D)), jnp.int32)
    key = jax.random.PRNGKey(5)

    options = {"clip": [0.3, 0.8], "resample": True, "block_size": L, "ignore_bos": True}
    objectives = (_objective(**options), _objective(**options, loss_reduction="token_mean"))

    @jax.jit
    def both(logits):
        def terms(objective, table_logits):
            table = eqx.tree_at(lambda m: m.network.logits, model, table_logits)
            return objective.batch_terms(table, x0, key=key)

        def loss(objective, table_logits):
            out = terms(objective, table_logits)
            return out.loss, out.nelbo

        return [jax.value_and_grad(lambda a, o=o: loss(o, a), has_aux=True)(logits) for o in objectives]

    ((loss_s, nelbo_s), grad_s), ((loss_t, nelbo_t), grad_t) = both(model.network.logits)
    np.testing.assert_allclose(float(loss_t), float(loss_s) / D, rtol=1e-6)
    assert float(nelbo_t) == float(nelbo_s)
    np.testing.assert_allclose(np.asarray(grad_t), np.asarray(grad_s) / D, rtol=1e-5, atol=1e-8)


def test_meaningless_training_options_are_one_line():
    for options, name in (
        ({"resample": True}, "resample"),
        ({"resample": True, "clip": [0.3, 0.45], "block_size": 4}, "clip"),
        ({"eval_interval": [0.5, 0.2]}, "eval_interval"),
    ):
        with pytest.raises(ddiff.RecipeError, match=name) as error:
            _objective(**options)
        assert "\n" not in str(error.value)
