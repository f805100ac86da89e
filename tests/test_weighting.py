"""Training weightings (the ``weighting`` slot): every objective that takes one keeps its
``nelbo`` exactly and changes its ``loss`` as documented, checked against independent
closed forms; the schedule of GenMD4 keeps the bound's gradient; recipes choose them and
bad ones are refused in one line."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddiff
import ddiff.runner
import ddiff.testing as kit

V, D = 3, 4
CROSS_ENTROPY = 0.3
WEIGHTINGS = (
    None,
    {"kind": "bound", "cross_entropy": CROSS_ENTROPY},
    {"kind": "unweighted", "cross_entropy": CROSS_ENTROPY},
)
CASES = {
    "md4_elbo": ({"kind": "masked", "schedule": "cosine"}, "mean"),
    "genmd4_elbo": (
        {
            "kind": "masked",
            "schedule": {"kind": "learnable_poly", "initial_powers": [0.7, 1.5, 3.0]},
        },
        "mean",
    ),
    "score_entropy": ({"kind": "masked", "schedule": "loglinear"}, "score"),
    "score_entropy[uniform]": ({"kind": "uniform", "schedule": "geometric"}, "x0"),
    "campbell_elbo": ({"kind": "masked", "schedule": "linear"}, "mean"),
    "campbell_elbo_single_jump[uniform]": ({"kind": "uniform", "schedule": "linear"}, "x0"),
}


def build(slot, spec):
    return ddiff.build_component(slot, spec, vocab_size=V, seq_len=D)


class _Lookup(ddiff.AbstractNetwork):
    """A fixed random network: output[n] = table[x_t^n, n] (1 + t)."""

    table: jax.Array
    time_conditioned: bool = eqx.field(static=True, default=True)
    num_classes: int = eqx.field(static=True, default=0)

    def __call__(self, x_t, t, *, label=None, key=None):
        return self.table[x_t, jnp.arange(x_t.shape[0])] * (1.0 + t)


def lookup_model(process_spec, parameterization):
    process = build("process", process_spec)
    parameterization = build("parameterization", parameterization)
    channels = parameterization.output_channels(process)
    table = jax.random.normal(jax.random.PRNGKey(0), (process.num_states, D, channels))
    return ddiff.DiffusionModel(
        network=_Lookup(table), parameterization=parameterization, process=process
    )


@eqx.filter_jit
def _all_terms(objectives, model, x0, key):
    return [o.per_example_terms(model, x0, key=key, train=False) for o in objectives]


def _rho(process, t):
    """rho(t) = 1 / mean_v(-alpha'_t[v] / (1 - alpha_t[v])), from alpha and its derivative."""
    schedule = process.schedule
    return 1.0 / jnp.mean(-schedule.alpha_derivative(t) / (1.0 - schedule.alpha(t)))


@pytest.mark.parametrize("case", list(CASES))
def test_nelbo_is_unchanged_and_the_loss_is_as_documented(case):
    """32 examples of the markov toy, same keys for every weighting, a fixed random network:
    ``nelbo`` is bit-for-bit the unweighted objective's; with ``bound`` and lambda = 0.3
    the loss is nelbo + 0.3 CE
    (float32: 1e-5 relative); ``unweighted`` gives nelbo + (rho(t) - 1) diffusion + 0.3 CE
    with rho(t) = 1 / mean_v(-alpha'/(1 - alpha)) computed here from the schedule; and on
    MD4 the loss is the plain masked cross-entropy plus the end terms, which the mean
    parameterization makes the cross-entropy of every position."""
    name = case.split("[")[0]
    process_spec, parameterization = CASES[case]
    model = lookup_model(process_spec, parameterization)
    objectives = [
        build("objective", name if w is None else {"kind": name, "weighting": w})
        for w in WEIGHTINGS
    ]
    x0, _ = kit.markov_toy(V, D).sample(jax.random.PRNGKey(1), 32)
    plain, hybrid, flat = _all_terms(objectives, model, x0, jax.random.PRNGKey(2))
    for terms in (hybrid, flat):
        np.testing.assert_array_equal(terms.nelbo, plain.nelbo)
    cross_entropy = np.asarray(hybrid.metrics["cross_entropy"])
    assert np.all(np.isfinite(cross_entropy)) and np.all(cross_entropy >= 0)
    np.testing.assert_allclose(
        hybrid.loss, plain.loss + CROSS_ENTROPY * cross_entropy, rtol=1e-5, atol=1e-5
    )

    time_key = jax.random.split(jax.random.PRNGKey(2))[0]
    t = objectives[0].sample_times(time_key, len(x0))
    if name == "genmd4_elbo":
        t = objectives[0].t1 + (1.0 - objectives[0].t1) * t
    rho = np.asarray(jax.vmap(lambda t: _rho(model.process, t))(t))
    diffusion = np.asarray(plain.metrics["diffusion"])
    expected = np.asarray(plain.loss) + (rho - 1.0) * diffusion + CROSS_ENTROPY * cross_entropy
    np.testing.assert_allclose(flat.loss, expected, rtol=1e-4, atol=1e-4)
    if name == "md4_elbo":
        ends = plain.metrics["reconstruction"] + plain.metrics["prior"]
        np.testing.assert_allclose(
            flat.loss, (1 + CROSS_ENTROPY) * cross_entropy + ends, rtol=1e-4, atol=1e-4
        )


def test_the_bound_without_cross_entropy_is_the_objective_s_own_loss():
    """``bound`` with lambda = 0 returns the objective's terms with the same loss and nelbo
    bit for bit (adding only the cross_entropy metric); no weighting returns them as
    they are."""
    terms = ddiff.ObjectiveTerms(
        loss=jnp.float32(1.25), nelbo=jnp.float32(1.0), metrics={"diffusion": jnp.float32(0.75)}
    )
    process = build("process", CASES["md4_elbo"][0])
    arguments = {"process": process, "t": jnp.float32(0.4), "cross_entropy": jnp.float32(2.0)}
    assert ddiff.weighted_terms(None, terms, **arguments) is terms
    same = ddiff.weighted_terms(build("weighting", "bound"), terms, **arguments)
    assert (
        same.loss.item() == 1.25
        and same.nelbo.item() == 1.0
        and same.metrics["cross_entropy"].item() == 2.0
    )


def test_the_genmd4_schedule_keeps_the_bound_gradient():
    """GenMD4 with unequal learnable powers: the gradient of the mean loss with respect to
    the schedule's parameters is the same with and without the ``unweighted`` weighting
    and a cross-entropy (the re-weighting reaches the network only; 1e-5 relative), while
    the network's gradient changes."""
    process_spec, parameterization = CASES["genmd4_elbo"]
    model = lookup_model(process_spec, parameterization)
    x0, _ = kit.markov_toy(V, D).sample(jax.random.PRNGKey(1), 32)
    plain = build("objective", "genmd4_elbo")
    weighted = build(
        "objective",
        {"kind": "genmd4_elbo", "weighting": {"kind": "unweighted", "cross_entropy": 1.0}},
    )

    @eqx.filter_jit
    def gradients(objective, model):
        def loss(model):
            return objective.batch_terms(model, x0, key=jax.random.PRNGKey(2), train=False).loss

        return eqx.filter_grad(loss)(model)

    before, after = gradients(plain, model), gradients(weighted, model)
    np.testing.assert_allclose(
        after.process.schedule.phi, before.process.schedule.phi, rtol=1e-5, atol=1e-7
    )
    assert float(jnp.max(jnp.abs(before.process.schedule.phi))) > 0
    network = [
        np.asarray(a) - np.asarray(b)
        for a, b in zip(
            jax.tree.leaves(after.network), jax.tree.leaves(before.network), strict=True
        )
    ]
    assert max(float(np.max(np.abs(d))) for d in network) > 1e-3


def test_recipes_choose_a_weighting_and_bad_ones_are_one_line(tiny_overrides):
    """A weighting in a recipe is built and shown in the resolved recipe; an unknown kind
    names the registered ones; a score network on the uniform process has no clean-token
    posterior for a cross-entropy, which is refused at load time."""
    recipe = ddiff.runner.load_recipe(
        "recipes/quickstart.yaml",
        (
            *tiny_overrides,
            "objective={kind: md4_elbo, weighting: {kind: unweighted, cross_entropy: 0.5}}",
        ),
    )
    assert recipe.objective.weighting.cross_entropy == 0.5
    assert ddiff.default_registry().names("weighting") == ["bound", "unweighted"]
    with pytest.raises(
        ddiff.RecipeError,
        match=r"objective\.weighting\.kind: unknown weighting 'bond'.*did you mean 'bound'",
    ):
        ddiff.runner.load_recipe(
            "recipes/quickstart.yaml", (*tiny_overrides, "objective.weighting={kind: bond}")
        )
    uniform = (
        *tiny_overrides, "process={kind: uniform, schedule: {kind: geometric}}", "parameterization={kind: score}",
        "sampler={kind: euler}",
    )  # fmt: skip
    ddiff.runner.load_recipe(
        "recipes/quickstart.yaml",
        (*uniform, "objective={kind: score_entropy, weighting: {kind: unweighted}}"),
    )
    with pytest.raises(
        ddiff.IncompatibleComponentsError, match="needs the model's clean-token posterior"
    ):
        ddiff.runner.load_recipe(
            "recipes/quickstart.yaml",
            (
                *uniform,
                "objective={kind: score_entropy, weighting: {kind: bound, cross_entropy: 0.1}}",
            ),
        )


def test_every_recipe_header_states_its_weighting():
    """Every shipped recipe says in its opening comment which weighting it trains with; the
    Campbell recipe uses tauLDR's nll_weight 0.001 per position over its 256 characters."""
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        header = path.read_text().split("\n\n")[0]
        opening = [line for line in header.split("\n") if line.startswith("#")]
        assert any(line.startswith("# Weighting: ") for line in opening), path.name
    campbell = ddiff.runner.read_recipe_file("recipes/campbell_text8.yaml")
    assert campbell["objective"]["weighting"] == {"kind": "bound", "cross_entropy": 0.001 / 256}
    assert campbell["data"]["length"] == 256
