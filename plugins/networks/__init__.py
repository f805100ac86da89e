"""Built-in networks: a bidirectional transformer with adaptive layer norm (DiT-style),
the MD4 paper's transformer (rotary positions, adaLN-zero, GLU feed-forward, depth-scaled
initialisation), and the single-resolution UNet of the paper's image experiments."""

import ddiff
from ddiff_plugins.networks._layers import (
    AttentionKind,
    ConditionEmbedding,
    KVCache,
    MLPKind,
    PastKeys,
    RotaryBlock,
    apply_rotary,
    attention,
    block_causal_mask,
    dense,
    rotary,
    rotary_tables,
    timestep_features,
    transformer_flops_per_token,
)
from ddiff_plugins.networks._md4_transformer import MD4Transformer
from ddiff_plugins.networks._transformer import SelfAttention, Transformer, TransformerBlock
from ddiff_plugins.networks._unet import (
    PatchTransformer,
    ResidualBlock,
    SelfAttention2d,
    UNet,
    sincos_2d,
)

__all__ = [
    "AttentionKind",
    "ConditionEmbedding",
    "KVCache",
    "MD4Transformer",
    "MLPKind",
    "PastKeys",
    "PatchTransformer",
    "ResidualBlock",
    "RotaryBlock",
    "SelfAttention",
    "SelfAttention2d",
    "Transformer",
    "TransformerBlock",
    "UNet",
    "apply_rotary",
    "attention",
    "block_causal_mask",
    "dense",
    "rotary",
    "rotary_tables",
    "sincos_2d",
    "timestep_features",
    "transformer_flops_per_token",
]


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register("network", "transformer", Transformer)
    registry.register("network", "md4_transformer", MD4Transformer)
    registry.register("network", "unet", UNet)
