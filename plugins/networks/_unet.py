"""The single-resolution UNet of the MD4 paper's image experiments."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import ddiff
from ddiff import nn
from ddiff_plugins.networks._blocks import (
    ConditionEmbedding,
    rotary_blocks,
    rotary_flops,
    run_rotary_blocks,
)


class ResidualBlock(eqx.Module):
    """Residual block of the single-resolution UNet, on (channels, height, width):
    GroupNorm, SiLU, 3x3 conv, plus a (zero-initialised) projection of the conditioning
    vector, GroupNorm, SiLU, dropout, zero-initialised 3x3 conv; a 1x1 conv maps the
    input when the channel count changes."""

    norm1: eqx.nn.GroupNorm
    conv1: eqx.nn.Conv2d
    cond_projection: eqx.nn.Linear
    norm2: eqx.nn.GroupNorm
    conv2: eqx.nn.Conv2d
    skip: eqx.nn.Conv2d | None
    dropout: float = eqx.field(static=True)

    def __init__(
        self, in_channels: int, out_channels: int, cond_dim: int, groups: int, dropout: float, *,
        key: ddiff.Key
    ):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.norm1 = eqx.nn.GroupNorm(groups, in_channels)
        self.conv1 = eqx.nn.Conv2d(in_channels, out_channels, 3, padding=1, key=k1)
        self.cond_projection = nn.zeroed(eqx.nn.Linear(cond_dim, out_channels, use_bias=False, key=k2))
        self.norm2 = eqx.nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.zeroed(eqx.nn.Conv2d(out_channels, out_channels, 3, padding=1, key=k3))
        self.skip = (
            eqx.nn.Conv2d(in_channels, out_channels, 1, key=k4)
            if in_channels != out_channels
            else None
        )
        self.dropout = dropout

    def __call__(
        self, x: Float[Array, "c h w"], cond: Float[Array, " cond"], *, key: ddiff.Key | None
    ) -> Float[Array, "c2 h w"]:
        h = self.conv1(jax.nn.silu(nn.group_norm(self.norm1, x)))
        h = h + self.cond_projection(cond)[:, None, None]
        h = nn.dropout(jax.nn.silu(nn.group_norm(self.norm2, h)), self.dropout, key)
        h = self.conv2(h)
        return (x if self.skip is None else self.skip(x)) + h


class SelfAttention2d(eqx.Module):
    """Residual single-head self-attention over all positions of a (channels, height,
    width) map, after a GroupNorm."""

    norm: eqx.nn.GroupNorm
    attention: eqx.nn.MultiheadAttention

    def __init__(self, channels: int, groups: int, *, key: ddiff.Key):
        self.norm = eqx.nn.GroupNorm(groups, channels)
        self.attention = eqx.nn.MultiheadAttention(
            1, channels, use_query_bias=True, use_key_bias=True, use_value_bias=True,
            use_output_bias=True, key=key,
        )  # fmt: skip

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "c h w"]:
        channels, height, width = x.shape
        z = nn.group_norm(self.norm, x).reshape(channels, height * width).T
        z = self.attention(z, z, z)
        return x + z.T.reshape(channels, height, width)


def sincos_2d(grid: int, dim: int) -> Float[Array, "patches dim"]:
    """Fixed 2-D sine-cosine position features of a grid x grid raster (as in DiT)."""
    quarter = dim // 4
    frequencies = 1.0 / 10_000.0 ** (jnp.arange(quarter) / quarter)
    rows, columns = jnp.meshgrid(jnp.arange(grid), jnp.arange(grid), indexing="ij")
    y = rows.reshape(-1)[:, None] * frequencies
    x = columns.reshape(-1)[:, None] * frequencies
    return jnp.concatenate([jnp.sin(y), jnp.cos(y), jnp.sin(x), jnp.cos(x)], axis=-1)


class PatchTransformer(eqx.Module):
    """The middle of a UViT (DiT-style): non-overlapping p x p patches embedded linearly
    plus learnable positions (initialised to 2-D sine-cosine features), the MD4
    transformer's :class:`RotaryBlock` blocks, and an adaLN-zero final layer whose
    zero-initialised linear map gives back p x p x channels patches."""

    patch_in: eqx.nn.Conv2d
    position: Float[Array, "patches dim"]
    blocks: nn.LayerStack
    final_modulation: eqx.nn.Linear
    patch_out: eqx.nn.Linear
    patch: int = eqx.field(static=True)
    depth: int = eqx.field(static=True)

    def __init__(
        self, channels: int, grid: int, patch: int, dim: int, depth: int, heads: int,
        dropout: float, *, key: ddiff.Key, remat: nn.RematPolicy = "none"
    ):
        if dim % 4:
            raise ddiff.RecipeError(
                f"must be a multiple of 4, got {dim}", path="transformer_dim"
            )
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.patch_in = eqx.nn.Conv2d(channels, dim, patch, stride=patch, key=k1)
        self.position = sincos_2d(grid, dim)
        self.blocks = rotary_blocks(
            dim, depth, heads, channels, "swiglu", 32, dropout, True, key=k2,
            path="transformer_heads", remat=remat,
        )  # fmt: skip
        self.final_modulation = nn.zero_linear(channels, 2 * dim, key=k3)
        self.patch_out = nn.zero_linear(dim, patch * patch * channels, key=k4)
        self.patch = patch
        self.depth = depth

    def __call__(
        self, x: Float[Array, "c h w"], cond: Float[Array, " cond"], *, key: ddiff.Key | None
    ) -> Float[Array, "c h w"]:
        channels, height, width = x.shape
        p = self.patch
        tokens = self.patch_in(x)
        dim = tokens.shape[0]
        tokens = tokens.reshape(dim, -1).T + self.position
        tokens = run_rotary_blocks(self.blocks, tokens, cond, key)
        final = nn.adaptive_layer_norm(tokens, self.final_modulation, jax.nn.silu(cond))
        patches = nn.dense(self.patch_out, final)
        patches = patches.reshape(height // p, width // p, p, p, channels)
        return patches.transpose(4, 0, 2, 1, 3).reshape(channels, height, width)


class UNet(ddiff.AbstractNetwork):
    """The single-resolution UNet of the MD4 (and VDM) image experiments, for images of
    ``image_shape`` flattened in (height, width, channel) order.

    Each sub-pixel token is embedded in ``channels`` dimensions and a pixel's embeddings
    are concatenated; a 3x3 conv maps them to ``channels``; ``num_blocks``
    :class:`ResidualBlock` blocks follow, each output kept; the middle is a residual
    block, single-head self-attention and a residual block (or, with
    ``transformer_depth`` > 0, a :class:`PatchTransformer`: the paper's UViT for ImageNet
    64x64); then ``num_blocks + 1`` residual blocks each take the concatenation with the
    matching kept map; GroupNorm, SiLU and a zero-initialised 3x3 conv give the output
    channels of every sub-pixel. Time and class condition every residual block.
    CIFAR-10: 128 channels, 32 blocks, dropout 0.1.

    Attributes (recipe keys):
        image_shape: (height, width, channels) of the images; their product is D.
        channels: feature channels (and the per-sub-pixel embedding width).
        num_blocks: residual blocks on the way down (one more on the way up).
        dropout: dropout rate in the residual blocks (and the middle transformer).
        groups: GroupNorm groups.
        transformer_depth: blocks of the middle patch transformer (0: self-attention).
        transformer_dim, transformer_heads, patch_size: its width, heads and patch side.
        time_conditioned: whether the output depends on t.
        remat: what each residual (and middle transformer) block's backward pass recomputes
            (:data:`ddiff.nn.REMAT_POLICIES`): ``none`` (the default), ``block``
            (everything), ``dots`` (all but the convolutions and matrix products),
            ``dots_no_batch``; same values.

    Model FLOPs per sub-pixel (:meth:`flops_per_token`): over the H x W pixels, 2 x the
    weights of every convolution applied at every pixel (the embedding's 3x3 conv, the
    residual blocks' convs and 1x1 skips, the output conv), plus the middle attention's
    projections 2 x 4 C^2 and products 4 (H W) C per pixel (or the patch transformer's
    2 N + 4 L d P per patch of the P patches, with its patch convs); divided by the
    C_img sub-pixels of a pixel. The per-image conditioning is not counted.
    """

    embedding: Float[Array, "states channels"]
    condition: ConditionEmbedding
    conv_in: eqx.nn.Conv2d
    down: nn.LayerStack
    middle_in: ResidualBlock | None
    middle_attention: SelfAttention2d | None
    middle_out: ResidualBlock | None
    middle_transformer: PatchTransformer | None
    up: nn.LayerStack
    norm_out: eqx.nn.GroupNorm
    conv_out: eqx.nn.Conv2d
    image_shape: tuple[int, int, int] = eqx.field(static=True)
    num_blocks: int = eqx.field(static=True)
    time_conditioned: bool = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)

    def __init__(
        self, *, num_states: int, num_outputs: int, seq_len: int, num_classes: int = 0,
        key: ddiff.Key, image_shape: tuple[int, int, int] = (32, 32, 3), channels: int = 128,
        num_blocks: int = 32, dropout: float = 0.1, groups: int = 32, transformer_depth: int = 0,
        transformer_dim: int = 768, transformer_heads: int = 12, patch_size: int = 2,
        time_conditioned: bool = True, remat: nn.RematPolicy = "none"
    ):
        height, width, colours = image_shape
        if height * width * colours != seq_len:
            raise ddiff.RecipeError(
                f"{height}x{width}x{colours} = {height * width * colours} sub-pixels, but the "
                f"data has sequences of {seq_len}",
                path="image_shape",
            )
        if channels % groups:
            raise ddiff.RecipeError(
                f"channels={channels} is not divisible by groups={groups}", path="groups"
            )
        if transformer_depth and (height != width or height % patch_size):
            raise ddiff.RecipeError(
                f"the middle transformer needs square images whose side is a multiple of "
                f"patch_size={patch_size}",
                path="patch_size",
            )

        def parts(key: ddiff.Key) -> dict[str, Any]:
            keys = jax.random.split(key, 7)

            def block(in_channels: int) -> Callable[[ddiff.Key], ResidualBlock]:
                return lambda k: ResidualBlock(in_channels, channels, channels, groups, dropout, key=k)

            middle: dict[str, Any] = dict.fromkeys(
                ("middle_in", "middle_attention", "middle_out", "middle_transformer")
            )
            if transformer_depth:
                middle["middle_transformer"] = PatchTransformer(
                    channels, height // patch_size, patch_size, transformer_dim,
                    transformer_depth, transformer_heads, dropout, key=keys[4], remat=remat,
                )  # fmt: skip
            else:
                k_in, k_attention, k_out = jax.random.split(keys[4], 3)
                middle["middle_in"] = block(channels)(k_in)
                middle["middle_attention"] = SelfAttention2d(channels, groups, key=k_attention)
                middle["middle_out"] = block(channels)(k_out)
            conv_out = eqx.nn.Conv2d(channels, colours * num_outputs, 3, padding=1, key=keys[6])
            return {
                "embedding": nn.token_table(num_states, channels, key=keys[0]),
                "condition": ConditionEmbedding(channels, time_conditioned, num_classes, key=keys[1]),
                "conv_in": eqx.nn.Conv2d(colours * channels, channels, 3, padding=1, key=keys[2]),
                "down": nn.stack_layers(block(channels), jax.random.split(keys[3], num_blocks), remat=remat),
                **middle,
                "up": nn.stack_layers(
                    block(2 * channels), jax.random.split(keys[5], num_blocks + 1), remat=remat
                ),
                "norm_out": eqx.nn.GroupNorm(groups, channels),
                "conv_out": nn.zeroed(conv_out),
            }

        built = nn.compiled_init(parts, key)
        self.embedding, self.condition, self.conv_in = (
            built["embedding"], built["condition"], built["conv_in"],
        )  # fmt: skip
        self.down, self.up = built["down"], built["up"]
        self.middle_in, self.middle_attention, self.middle_out, self.middle_transformer = (
            built["middle_in"], built["middle_attention"], built["middle_out"],
            built["middle_transformer"],
        )  # fmt: skip
        self.norm_out, self.conv_out = built["norm_out"], built["conv_out"]
        self.image_shape = (height, width, colours)
        self.num_blocks = num_blocks
        self.time_conditioned = time_conditioned
        self.num_classes = num_classes

    def flops_per_token(self, seq_len: int) -> float | None:
        height, width, _ = self.image_shape
        pixels = height * width
        blocks = [self.down.layers, self.up.layers, self.middle_in, self.middle_out]
        convs = [self.conv_in.weight, self.conv_out.weight]
        for block in blocks:
            if block is not None:
                convs += [block.conv1.weight, block.conv2.weight]
                convs += [] if block.skip is None else [block.skip.weight]
        flops = 2.0 * pixels * nn.parameter_count(*convs)
        if self.middle_attention is not None:
            attention = self.middle_attention.attention
            projections = (attention.query_proj, attention.key_proj, attention.value_proj, attention.output_proj)
            channels = self.conv_in.weight.shape[0]
            flops += 2.0 * pixels * nn.parameter_count(*(p.weight for p in projections)) + 4.0 * pixels**2 * channels
        if self.middle_transformer is not None:
            middle = self.middle_transformer
            patches = pixels // middle.patch**2
            patch_maps = nn.parameter_count(middle.patch_in.weight, middle.patch_out.weight)
            per_patch = rotary_flops(middle.blocks, patches) + 2.0 * patch_maps
            flops += patches * per_patch
        return flops / seq_len

    def __call__(
        self, x_t: ddiff.Tokens, t: ddiff.Time, *, label: ddiff.Label | None = None,
        key: ddiff.Key | None = None
    ) -> ddiff.NetworkOutput:
        height, width, colours = self.image_shape
        k_down, k_middle, k_up = nn.dropout_keys(key, 3)
        cond = self.condition(t, label)
        x = self.embedding[x_t.reshape(height, width, colours)]
        h = self.conv_in(x.reshape(height, width, -1).transpose(2, 0, 1))

        def down(block, h, k):
            h = block(h, cond, key=k)
            return h, h

        first = h
        h, kept = self.down(h, down, nn.stacked_dropout_keys(k_down, self.num_blocks))
        if self.middle_transformer is not None:
            h = self.middle_transformer(h, cond, key=k_middle)
        else:
            k_in, k_out = nn.dropout_keys(k_middle, 2)
            h = self.middle_in(h, cond, key=k_in)
            h = self.middle_out(self.middle_attention(h), cond, key=k_out)
        skips = jnp.concatenate([first[None], kept])[::-1]

        def up(block, h, sliced):
            skip, k = sliced
            return block(jnp.concatenate([h, skip]), cond, key=k), None

        h, _ = self.up(h, up, (skips, nn.stacked_dropout_keys(k_up, self.num_blocks + 1)))
        # The logits in float32 whatever the compute dtype (mixed precision).
        conv_out = ddiff.cast_floating(self.conv_out, jnp.float32)
        out = conv_out(jax.nn.silu(nn.group_norm(self.norm_out, h)).astype(jnp.float32))
        out = out.reshape(colours, -1, height, width).transpose(2, 3, 0, 1)
        return out.reshape(height * width * colours, -1)
