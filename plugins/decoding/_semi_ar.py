"""Semi-autoregressive block decoding (LLaDA, Nie et al. 2025)."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

import ddiff
from ddiff import capabilities as caps


class SemiAutoregressiveSampler(ddiff.AbstractLoopSampler):
    """Semi-autoregressive block decoding (LLaDA, Nie et al. 2025; MDLM's and BD3-LM's
    block-wise generation): the sequence is cut into blocks of ``block_length`` positions,
    decoded left to right, each by the ``inner`` sampler with the earlier blocks given and
    the later ones held masked (both as given positions, :class:`ddiff.Conditioning`;
    given positions of the caller stay given everywhere). Any masked sampler can be the
    inner one; its steps are per block, so the network evaluations add up over the
    ``ceil(D / block_length)`` blocks, one step of the driver's loop each. Block b draws
    from keys ``fold_in(keys[i], b)`` of the caller's keys.

    Distribution: with an exact inner sampler, an exact denoiser and a scalar schedule
    (a masked position then says nothing about its value) it is exact: each block is
    drawn from its conditional given the earlier ones, the chain rule (the conformance
    kit checks it). A learnt time-conditioned network sees the later blocks masked while
    the inner sampler's time runs to 0 within each block, a state its training never
    showed, so in practice it is a different sampler from the inner one: the one LLaDA's
    models are trained for.

    Attributes:
        inner: the sampler within each block (a section with its own ``kind``).
        block_length: positions per block.
    """

    requires = {"process": frozenset({caps.MASKED})}
    inner: ddiff.AbstractSampler
    block_length: int = eqx.field(static=True, default=16)

    def __check_init__(self):
        ddiff.check_at_least("block_length", self.block_length)

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
        """The caller's keys, which the blocks fold their index into."""
        return keys

    def done(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any,
        index: Int[Array, ""]
    ) -> Bool[Array, ""]:
        return index >= -(-tokens.shape[1] // self.block_length)

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
        begin = index * self.block_length
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
        output = self.inner.sample(
            prediction.model,
            keys=ddiff.step_keys(carry, index),
            seq_len=seq_len,
            conditioning=inner_conditioning,
        )
        return output.tokens, carry, output.num_function_evals
