"""The autoregressive family: a causal transformer trained with the exact next-token
likelihood and sampled left to right, as a judge of other models' samples (generative
perplexity) and as the baseline of the papers' comparisons.

It fits ddiff's protocols as the masked model of a process whose masking order is fixed:
the ``left_to_right`` process masks the last positions first, so at time t_n = 1 - n/D
exactly the first n positions are visible. Its denoiser at the first masked position n is
p(x_n | x_<n), the next-token distribution, so a model of it is an autoregressive model:
``next_token`` reads a network's output as mu at the masked positions, the
``next_token_nll`` objective is the exact negative log-likelihood -sum_n log p(x_n | x_<n)
(the process's D-step bound, with no gap), and the ``left_to_right`` sampler is its
ancestral sampler. A ``causal_transformer`` (output n sees inputs < n only) gives all D
conditionals from one call on the clean sequence. Capabilities keep the family apart:
the process is not ``masked`` (its masks are not independent per position), so no masked
diffusion objective or sampler accepts it, and this family's objective, parameterization
and sampler need a ``left_to_right`` process.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import ddiff
from ddiff import capabilities as caps

LEFT_TO_RIGHT = "left_to_right"
"""A process that masks positions in a fixed order, the last first (capability)."""
CAUSAL = "causal"
"""A network whose output at position n depends on its inputs at positions < n only."""
EXACT_LIKELIHOOD = "exact_likelihood"
"""An objective whose ``nelbo`` is exactly -log p_theta(x_0), not a bound."""


class VisibleFraction(ddiff.AbstractSchedule):
    """The schedule of the ``left_to_right`` process: alpha(t) = 1 - t, the fraction of
    visible positions (up to rounding to whole positions)."""

    def alpha(self, t):
        return 1.0 - t


def visible_count(t: ddiff.Time, seq_len: int) -> jax.Array:
    """How many leading positions of ``seq_len`` are visible at time t: the positions
    n < (1 - t) D, so exactly n at t = 1 - n/D (a margin of 1e-4 absorbs rounding)."""
    return jnp.ceil((1.0 - t) * seq_len - 1e-4).astype(jnp.int32)


class LeftToRightProcess(ddiff.AbstractForwardProcess):
    """Masking in a fixed order: at time t position n holds x_0^n when n < (1 - t) D and
    the mask state V otherwise, so x_1 is all-mask (the prior) and x_0 is clean. The
    marginals are deterministic and factorize over positions, but depend on the position,
    so the process offers neither discrete-time transitions nor rates, and it is not
    ``masked`` in ddiff's sense (independent masking per position): only the
    autoregressive family pairs with it.

    Attributes:
        vocab_size: V (ddiff sets it from the data).
    """

    vocab_size: int = eqx.field(static=True)

    @property
    def schedule(self) -> ddiff.AbstractSchedule:
        return VisibleFraction()

    @property
    def num_states(self) -> int:
        return self.vocab_size + 1

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def capabilities(self):
        return frozenset({caps.FACTORIZED, LEFT_TO_RIGHT})

    def marginal_probs(self, x0, t):
        visible = jnp.arange(x0.shape[0]) < visible_count(t, x0.shape[0])
        return jax.nn.one_hot(jnp.where(visible, x0, self.mask_id), self.num_states)

    def prior_probs(self):
        return jax.nn.one_hot(self.mask_id, self.num_states)


class NextTokenParameterization(ddiff.AbstractMeanParameterization):
    """mu at a masked position is the softmax of the network's V outputs there; a visible
    position carries its token over. With the ``left_to_right`` process the first masked
    position n reads p(x_n | x_<n): a causal network's output row n is the next-token
    distribution."""

    provides = frozenset({caps.MEAN})
    requires = {"process": frozenset({LEFT_TO_RIGHT})}

    def output_channels(self, process):
        return process.vocab_size

    def log_mean(self, output, x_t, t, process):
        masked = (x_t == process.vocab_size)[:, None]
        carried = jnp.where(jax.nn.one_hot(x_t, process.vocab_size, dtype=bool), 0.0, -jnp.inf)
        return jnp.where(masked, jax.nn.log_softmax(output, axis=-1), carried)


class CausalBlock(eqx.Module):
    """Pre-norm causal multi-head self-attention and a GELU MLP, each residual."""

    qkv: eqx.nn.Linear
    out: eqx.nn.Linear
    mlp_in: eqx.nn.Linear
    mlp_out: eqx.nn.Linear
    norm1: eqx.nn.LayerNorm
    norm2: eqx.nn.LayerNorm
    heads: int = eqx.field(static=True)
    dropout: float = eqx.field(static=True)

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float, *, key: ddiff.Key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.qkv = eqx.nn.Linear(dim, 3 * dim, use_bias=False, key=k1)
        self.out = eqx.nn.Linear(dim, dim, key=k2)
        self.mlp_in = eqx.nn.Linear(dim, mlp_ratio * dim, key=k3)
        self.mlp_out = eqx.nn.Linear(mlp_ratio * dim, dim, key=k4)
        self.norm1 = eqx.nn.LayerNorm(dim)
        self.norm2 = eqx.nn.LayerNorm(dim)
        self.heads = heads
        self.dropout = dropout

    def __call__(self, x: Float[Array, "seq dim"], *, key: ddiff.Key | None) -> Float[Array, "seq dim"]:
        seq, dim = x.shape
        head_dim = dim // self.heads
        keys = (None,) * 3 if key is None else tuple(jax.random.split(key, 3))
        q, k, v = jnp.split(jax.vmap(self.qkv)(jax.vmap(self.norm1)(x)), 3, axis=-1)
        q, k, v = (a.reshape(seq, self.heads, head_dim) for a in (q, k, v))
        scores = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
        causal = jnp.tril(jnp.ones((seq, seq), bool))
        weights = _dropout(jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1), self.dropout, keys[0])
        attended = jnp.einsum("hqk,khd->qhd", weights, v).reshape(seq, dim)
        x = x + _dropout(jax.vmap(self.out)(attended), self.dropout, keys[1])
        hidden = jax.nn.gelu(jax.vmap(self.mlp_in)(jax.vmap(self.norm2)(x)))
        return x + _dropout(jax.vmap(self.mlp_out)(hidden), self.dropout, keys[2])


def _dropout(x: Array, rate: float, key: ddiff.Key | None) -> Array:
    """Inverted dropout; the identity without a key (inference) or at rate 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


class CausalTransformer(ddiff.AbstractNetwork):
    """A decoder-only transformer: the input is shifted right by one (position 0 reads the
    mask state V as a start token), learned absolute positions are added, and causal
    self-attention lets output n see inputs at positions < n only (capability
    ``causal``), so one call on a sequence gives every next-token distribution. A class
    label (index ``num_classes`` is the null class, for guidance) is added to every
    position. It ignores t.

    Attributes (recipe keys):
        dim: width. depth: number of blocks. heads: attention heads.
        mlp_ratio: hidden width of the MLP over ``dim``. dropout: dropout rate.
    """

    token_embedding: eqx.nn.Embedding
    position_embedding: Float[Array, "seq dim"]
    class_embedding: eqx.nn.Embedding | None
    blocks: ddiff.LayerStack
    final_norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear
    start_token: int = eqx.field(static=True)
    time_conditioned: bool = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)

    def __init__(
        self,
        *,
        num_states: int,
        num_outputs: int,
        seq_len: int,
        num_classes: int = 0,
        key: ddiff.Key,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ):
        if dim % heads != 0:
            raise ddiff.RecipeError(f"dim={dim} must be a multiple of heads={heads}", path="dim")
        ddiff.check_at_least("depth", depth)
        keys = jax.random.split(key, depth + 4)
        self.token_embedding = eqx.nn.Embedding(num_states, dim, key=keys[0])
        self.position_embedding = 0.02 * jax.random.normal(keys[1], (seq_len, dim))
        self.class_embedding = (
            eqx.nn.Embedding(num_classes + 1, dim, key=keys[2]) if num_classes > 0 else None
        )
        self.blocks = ddiff.stack_layers(
            lambda k: CausalBlock(dim, heads, mlp_ratio, dropout, key=k), keys[4:]
        )
        self.final_norm = eqx.nn.LayerNorm(dim)
        self.head = eqx.nn.Linear(dim, num_outputs, key=keys[3])
        self.start_token = num_states - 1
        self.time_conditioned = False
        self.num_classes = num_classes

    def capabilities(self):
        classes = {caps.CLASS_CONDITIONAL} if self.num_classes > 0 else set()
        return frozenset({caps.TIME_INDEPENDENT, CAUSAL, *classes})

    def __call__(self, x_t, t, *, label=None, key=None):
        shifted = jnp.concatenate([jnp.full((1,), self.start_token, x_t.dtype), x_t[:-1]])
        x = jax.vmap(self.token_embedding)(shifted) + self.position_embedding[: x_t.shape[0]]
        if self.class_embedding is not None:
            x = x + self.class_embedding(self.num_classes if label is None else label)
        keys = None if key is None else jax.random.split(key, self.blocks.count)
        x, _ = self.blocks(x, lambda block, h, k: (block(h, key=k), None), keys)
        return jax.vmap(self.head)(jax.vmap(self.final_norm)(x))


def prefix_state(x0: ddiff.Tokens, visible: jax.Array, mask_id: int) -> ddiff.Tokens:
    """x0 with its first ``visible`` positions kept and the rest masked: the state of the
    ``left_to_right`` process at t = 1 - visible / D."""
    return jnp.where(jnp.arange(x0.shape[0]) < visible, x0, mask_id)


class NextTokenNLL(ddiff.AbstractObjective):
    """The exact negative log-likelihood of an autoregressive model,

        -log p_theta(x_0) = -sum_n log mu_theta(x_t_n, t_n)[n, x_0^n],  t_n = 1 - n/D,

    where x_t_n shows the first n positions (the ``left_to_right`` process's D-step bound,
    which has no gap: each step reveals one known position). For a causal network that
    ignores t all D terms come from one call on x_0 (its output row n equals the row it
    gives at x_t_n, where position n is masked); any other network is called at each
    x_t_n. Its ``nelbo`` is exact (capability ``exact_likelihood``): one time draw per
    sequence suffices in evaluation.
    """

    provides = frozenset({EXACT_LIKELIHOOD})
    requires = {
        "parameterization": frozenset({caps.MEAN}),
        "process": frozenset({LEFT_TO_RIGHT}),
    }

    def example_terms(self, model, x0, t, *, key, label=None, train=True):
        process = model.process
        seq_len = x0.shape[0]
        network_key = key if train else None
        network_caps = model.network.capabilities()
        if CAUSAL in network_caps and caps.TIME_INDEPENDENT in network_caps:
            output = model.network_output(x0, jnp.ones(()), label=label, key=network_key)
            all_masked = jnp.full_like(x0, process.mask_id)
            log_mean = model.parameterization.log_mean(output, all_masked, jnp.ones(()), process)
        else:

            def row(n):
                time = 1.0 - n.astype(jnp.float32) / seq_len
                state = prefix_state(x0, n, process.mask_id)
                return model.log_mean(state, time, label=label, key=network_key)[n]

            log_mean = jax.vmap(row)(jnp.arange(seq_len))
        picked = jnp.take_along_axis(log_mean, x0[:, None], axis=-1)[:, 0]
        nll = -jnp.sum(picked)
        return ddiff.ObjectiveTerms(loss=nll, nelbo=nll, metrics={"nll": nll})


class LeftToRightSampler(ddiff.AbstractSampler):
    """Ancestral sampling of an autoregressive model: position n = 0..D-1 is drawn from
    mu_theta(x_t_n, t_n)[n] = p_theta(x_n | x_<n) (exactly, :func:`ddiff.categorical`)
    with the earlier positions visible and the later ones masked; one network call per
    position (doubled under guidance), skipped where every sample gives the position.
    Labels and classifier-free guidance go through :func:`ddiff.batched_log_mean`.

    Distribution: exactly the model's. Infilling keeps every given position; a given
    prefix is conditioned on exactly, but a position given after a free one is not seen
    by the draws before it (an autoregressive model cannot look ahead), so such samples
    are not drawn from the conditional given it.
    """

    requires = {
        "parameterization": frozenset({caps.MEAN}),
        "process": frozenset({LEFT_TO_RIGHT}),
    }

    def sample(self, model, *, keys, seq_len, conditioning):
        process = model.process
        start = ddiff.start_sampling(model, keys=keys, seq_len=seq_len, conditioning=conditioning)
        batch = keys.shape[0]
        given, given_tokens = conditioning.given(batch, seq_len)

        def step(carry, n):
            x, evals = carry

            def draw(x):
                time = 1.0 - n.astype(jnp.float32) / seq_len
                log_mean, calls = ddiff.batched_log_mean(model, x, time, conditioning)
                keys = ddiff.step_keys(start.loop_keys, n)
                return jax.vmap(ddiff.categorical)(keys, log_mean[:, n]), jnp.int32(calls)

            drawn, used = jax.lax.cond(
                jnp.all(given[:, n]), lambda x: (given_tokens[:, n], jnp.int32(0)), draw, x
            )
            x = x.at[:, n].set(jnp.where(given[:, n], given_tokens[:, n], drawn))
            return (x, evals + used), None

        initial = jnp.full((batch, seq_len), process.mask_id, jnp.int32)
        (x, evals), _ = jax.lax.scan(step, (initial, jnp.int32(0)), jnp.arange(seq_len))
        return ddiff.SampleOutput(tokens=x, num_function_evals=evals)


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register("process", "left_to_right", LeftToRightProcess)
    registry.register("parameterization", "next_token", NextTokenParameterization)
    registry.register("network", "causal_transformer", CausalTransformer)
    registry.register("objective", "next_token_nll", NextTokenNLL)
    registry.register("sampler", "left_to_right", LeftToRightSampler)
