"""Semi-autoregressive block decoding (LLaDA, Nie et al. 2025)."""

from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

import ddiff
from ddiff import capabilities as caps

BlockAlignment = Literal["prompt", "start"]
"""Where the first block begins: at the end of the prompt (LLaDA's ``generate``, blocks
counted from the prompt's end) or at position 0 (blocks at fixed positions)."""


class _PromptMaskedGuidance(ddiff.AbstractNetwork):
    """A network guided against itself with the prompt masked (LLaDA's unsupervised
    classifier-free guidance, ``cfg_scale``): output = u + (1 + w) (c - u), with c the
    network's output on x and u its output on x with the first ``prompt_length``
    positions masked. Under the ``mean`` parameterization this is
    log_softmax((1 + w) log mu_c - w log mu_u) at a masked position, as LLaDA mixes its
    logits. Two network calls per call.

    Attributes:
        network: the guided network.
        prompt_length: P, the positions masked for the unconditional output.
        scale: w.
        mask_id: the mask token.
        time_conditioned, num_classes: the guided network's.
    """

    network: ddiff.AbstractNetwork
    prompt_length: Int[Array, ""]
    scale: float = eqx.field(static=True)
    mask_id: int = eqx.field(static=True)
    time_conditioned: bool = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)

    def __call__(
        self, x_t: ddiff.Tokens, t: ddiff.Time, *, label: ddiff.Label | None = None,
        key: ddiff.Key | None = None
    ) -> ddiff.NetworkOutput:
        prompt = jnp.arange(x_t.shape[0]) < self.prompt_length
        conditional = self.network(x_t, t, label=label, key=key)
        unconditional = self.network(jnp.where(prompt, self.mask_id, x_t), t, label=label, key=key)
        finite = jnp.isfinite(conditional) & jnp.isfinite(unconditional)
        mixed = unconditional + (1.0 + self.scale) * (conditional - unconditional)
        return jnp.where(finite, mixed, conditional)


class _Blocks(eqx.Module):
    """The block loop's carry.

    Attributes:
        keys: the caller's per-sample keys (block b draws from ``fold_in(key, b)``).
        begin: where block 0 begins: P, the prompt's length, or 0.
    """

    keys: ddiff.KeyBatch
    begin: Int[Array, ""]


def prompt_length(conditioning: ddiff.Conditioning, batch: int, seq_len: int) -> jax.Array:
    """P, the prompt's length: the number of leading positions given in every sample of the
    batch (LLaDA's prompt tensor, one length for the batch; ``ddiff sample --prefix``
    gives every sample the same), 0 without given positions."""
    given, _ = conditioning.given(batch, seq_len)
    leading = jnp.where(jnp.all(given, axis=1), seq_len, jnp.argmin(given, axis=1))
    return jnp.min(leading).astype(jnp.int32)


class SemiAutoregressiveSampler(ddiff.AbstractLoopSampler):
    """Semi-autoregressive block decoding (LLaDA, Nie et al. 2025; MDLM's and BD3-LM's
    block-wise generation): the sequence is cut into blocks of ``block_length`` positions,
    decoded left to right, each by the ``inner`` sampler with the earlier blocks given and
    the later ones held masked (both as given positions, :class:`ddiff.Conditioning`;
    given positions of the caller stay given everywhere). Any masked sampler can be the
    inner one; its steps are per block, so the network evaluations add up over the
    blocks, one step of the driver's loop each. Block b draws from keys
    ``fold_in(keys[i], b)`` of the caller's keys.

    Blocks begin at the end of the prompt (:func:`prompt_length`, P: the leading positions
    given in every sample), as LLaDA's ``generate`` counts them: block b covers
    [P + b L, P + (b + 1) L), ceil((D - P) / L) blocks. That is the default (``align``
    unset) and reduces to blocks from position 0 without a prompt; ``align: start`` counts
    them from position 0 whatever is given (the two agree when L divides P).
    ``prompt_guidance: w`` is LLaDA's ``cfg_scale``: every network call is guided against
    the network's output with the prompt masked (:class:`_PromptMaskedGuidance`), two
    calls each.

    Distribution: with an exact inner sampler, an exact denoiser and a scalar schedule
    (a masked position then says nothing about its value) it is exact, for either
    alignment: each block is drawn from its conditional given the earlier ones, the chain
    rule (the conformance kit checks it). A learnt time-conditioned network sees the
    later blocks masked while the inner sampler's time runs to 0 within each block, a
    state its training never showed, so in practice it is a different sampler from the
    inner one: the one LLaDA's models are trained for. Prompt guidance draws from no
    model's distribution.

    Attributes:
        inner: the sampler within each block (a section with its own ``kind``).
        block_length: positions per block, L.
        align: ``prompt`` or ``start`` (:data:`BlockAlignment`); unset, ``prompt`` when a
            prompt is given, which without one is ``start``.
        prompt_guidance: w >= 0, LLaDA's ``cfg_scale`` (0: none).
    """

    requires = {"process": frozenset({caps.MASKED})}
    inner: ddiff.AbstractSampler
    block_length: int = eqx.field(static=True, default=16)
    align: BlockAlignment | None = eqx.field(static=True, default=None)
    prompt_guidance: float = eqx.field(static=True, default=0.0)

    def __check_init__(self):
        ddiff.check_at_least("block_length", self.block_length)
        ddiff.check_at_least("prompt_guidance", self.prompt_guidance, 0.0)

    def pairing_problem(self, components):
        inner = {
            slot: value
            for slot, value in components.items()
            if slot in ("process", "parameterization", "network", "schedule")
        }
        inner["sampler"] = ("inner", self.inner)
        try:
            caps.check_compatibility(inner, deferred=("network",))
        except ddiff.IncompatibleComponentsError as error:
            return f"its inner sampler does not fit: {error.message}"
        return None

    def init(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, *, keys: ddiff.KeyBatch
    ) -> Any:
        """The caller's keys, which the blocks fold their index into, and where block 0
        begins; refuses ``align: prompt`` and prompt guidance without a prompt."""
        conditioning = prediction.conditioning
        if conditioning.fixed_mask is None:
            for name, wanted in (("align", self.align == "prompt"), ("prompt_guidance", self.prompt_guidance > 0)):
                if wanted:
                    raise ddiff.RecipeError(
                        f"{name} needs a prompt (given leading positions, e.g. ddiff sample "
                        f"--prefix) and these samples have none",
                        path=f"sampler.{name}",
                    )
        begin = jnp.int32(0)
        if self.align != "start":
            begin = prompt_length(conditioning, *tokens.shape)
        return _Blocks(keys=keys, begin=begin)

    def done(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any,
        index: Int[Array, ""]
    ) -> Bool[Array, ""]:
        return index * self.block_length >= tokens.shape[1] - carry.begin

    def _guided(self, model: ddiff.DiffusionModel, prompt: jax.Array) -> ddiff.DiffusionModel:
        """The model whose network is guided against itself with the prompt masked."""
        network = model.network
        guided = _PromptMaskedGuidance(
            network=network,
            prompt_length=prompt,
            scale=self.prompt_guidance,
            mask_id=model.process.mask_id,
            time_conditioned=network.time_conditioned,
            num_classes=network.num_classes,
        )
        return ddiff.DiffusionModel(
            network=guided,
            parameterization=model.parameterization,
            process=model.process,
            compute_dtype=model.compute_dtype,
        )

    def step(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any,
        index: Int[Array, ""], *, keys: ddiff.KeyBatch
    ) -> tuple[ddiff.TokenBatch, Any, ddiff.Calls]:
        """Block ``index`` decoded by the inner sampler, the earlier blocks given and the
        later ones held masked."""
        conditioning = prediction.conditioning
        batch, seq_len = tokens.shape
        positions = jnp.arange(seq_len)
        given, given_tokens = conditioning.given(batch, seq_len)
        begin = carry.begin + index * self.block_length
        before = (positions < begin)[None, :]
        after = (positions >= begin + self.block_length)[None, :]
        held = jnp.where(given, given_tokens, prediction.model.process.mask_id)
        inner_conditioning = ddiff.Conditioning(
            labels=conditioning.labels,
            fixed_tokens=jnp.where(before, tokens, held),
            fixed_mask=given | before | after,
            guidance=conditioning.guidance,
            start_from_prior=conditioning.start_from_prior,
        )
        model, per_call = prediction.model, 1
        if self.prompt_guidance > 0:
            model, per_call = self._guided(model, prompt_length(conditioning, batch, seq_len)), 2
        output = self.inner.sample(
            model,
            keys=ddiff.step_keys(carry.keys, index),
            seq_len=seq_len,
            conditioning=inner_conditioning,
        )
        return output.tokens, carry, per_call * output.num_function_evals
