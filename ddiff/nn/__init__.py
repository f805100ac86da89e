"""Layers for network authors, used by every built-in network: attention with a choice of
backend and its masks, rotary position embeddings, token and class embeddings,
normalisation in float32, adaptive layer norm, dropout, position-wise linear layers and their initialisation, the time
features of diffusion, the key-value cache of block-by-block attention, stacks of
identical layers, and the declaration of their tensor-parallel split. Each works on one example; callers vmap."""

from ddiff._layers import REMAT_POLICIES, LayerStack, RematPolicy, stack_layers
from ddiff.nn._attention import (
    AttentionKind,
    AttentionMask,
    attention,
    block_causal_mask,
    causal_mask,
    splash_attention,
    splash_block,
)
from ddiff.nn._cache import KVCache, PastKeys
from ddiff.nn._dense import (
    GLU_ACTIVATIONS,
    GLUKind,
    dense,
    logits,
    parameter_count,
    scaled_linear,
    transformer_flops_per_token,
    zero_linear,
    zeroed,
)
from ddiff.nn._embedding import class_embedding, embed_class, token_table
from ddiff.nn._init import compiled_init
from ddiff.nn._norms import (
    adaptive_layer_norm,
    group_norm,
    layer_norm,
    modulate,
    timestep_features,
)
from ddiff.nn._parallel import AbstractTensorParallel, TensorSplit, split_over_model
from ddiff.nn._random import dropout, dropout_keys, stacked_dropout_keys
from ddiff.nn._rotary import apply_rotary, rotary, rotary_tables

__all__ = [
    # attention
    "AttentionKind",
    "AttentionMask",
    "attention",
    "block_causal_mask",
    "causal_mask",
    "splash_attention",
    "splash_block",
    # block-by-block attention
    "KVCache",
    "PastKeys",
    # rotary positions
    "apply_rotary",
    "rotary",
    "rotary_tables",
    # embeddings
    "class_embedding",
    "embed_class",
    "token_table",
    # normalisation and conditioning
    "adaptive_layer_norm",
    "group_norm",
    "layer_norm",
    "modulate",
    "timestep_features",
    # dropout
    "dropout",
    "dropout_keys",
    "stacked_dropout_keys",
    # linear layers
    "GLUKind",
    "GLU_ACTIVATIONS",
    "dense",
    "logits",
    "scaled_linear",
    "zero_linear",
    "zeroed",
    # initialisation and cost
    "compiled_init",
    "parameter_count",
    "transformer_flops_per_token",
    # stacks of layers
    "LayerStack",
    "REMAT_POLICIES",
    "RematPolicy",
    "stack_layers",
    # tensor parallelism
    "AbstractTensorParallel",
    "TensorSplit",
    "split_over_model",
]
