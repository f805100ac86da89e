"""Built-in networks: a bidirectional transformer with adaptive layer norm (DiT-style),
the MD4 paper's transformer (rotary positions, adaLN-zero, GLU feed-forward, depth-scaled
initialisation), and the single-resolution UNet of the paper's image experiments. Their
layers are :mod:`ddiff.nn`'s."""

import ddiff
from ddiff_plugins.networks._blocks import ConditionEmbedding, RotaryBlock
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
    "COMPONENTS",
    "ConditionEmbedding",
    "MD4Transformer",
    "PatchTransformer",
    "ResidualBlock",
    "RotaryBlock",
    "SelfAttention",
    "SelfAttention2d",
    "Transformer",
    "TransformerBlock",
    "UNet",
    "sincos_2d",
]


COMPONENTS: dict[str, dict[str, type]] = {
    "network": {"transformer": Transformer, "md4_transformer": MD4Transformer, "unet": UNet},
}
"""Registry slot -> registered name -> class: what this plugin registers."""


@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register_all(COMPONENTS)
