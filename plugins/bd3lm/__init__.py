"""Block diffusion (BD3-LM; Arriola et al., ICLR 2025): autoregressive over blocks of L'
tokens, masked diffusion within a block given the clean blocks before it.

    log p(x) = sum_b log p(x^b | x^{<b}),   -log p(x^b | x^{<b}) <= L_MD4(x^b; x^{<b}),

each block's bound being the MD4 continuous-time ELBO of a masked diffusion over its L'
positions, read by a network that sees the block's noisy tokens and the earlier blocks'
clean ones (``ddiff.AbstractBlockCausalNetwork``). L' = 1 is an autoregressive model,
L' = D is MD4. See docs/bd3lm.md.
"""

import ddiff
from ddiff_plugins.bd3lm._objective import BD3LMELBO, allowed_counts, block_keep
from ddiff_plugins.bd3lm._sampler import BD3LMSampler, unigram_entropy

__all__ = ["COMPONENTS", "BD3LMELBO", "BD3LMSampler", "allowed_counts", "block_keep", "unigram_entropy"]


COMPONENTS: dict[str, dict[str, type]] = {
    "objective": {"bd3lm_elbo": BD3LMELBO},
    "sampler": {"bd3lm": BD3LMSampler},
}
"""Registry slot -> registered name -> class: what this plugin registers."""


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register_all(COMPONENTS)
