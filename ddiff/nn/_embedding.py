"""Embedding tables: tokens and class labels (with the null class of guidance)."""

import math

import equinox as eqx
import jax
from jaxtyping import Array, Float

from ddiff._typing import Key, Label


def token_table(num_states: int, dim: int, *, key: Key) -> Float[Array, "states dim"]:
    """A token embedding table of ``num_states`` rows with N(0, 1 / num_states) entries
    (the MD4 networks' initialisation); a token's embedding is its row."""
    return jax.random.normal(key, (num_states, dim)) / math.sqrt(num_states)


def class_embedding(num_classes: int, dim: int, *, key: Key) -> eqx.nn.Embedding | None:
    """A learned N(0, 1) embedding of the labels 0..num_classes - 1 and of the null class
    ``num_classes`` (classifier-free guidance), or None for unconditional data
    (``num_classes`` 0); read it with :func:`embed_class`."""
    return eqx.nn.Embedding(num_classes + 1, dim, key=key) if num_classes > 0 else None


def embed_class(embedding: eqx.nn.Embedding, label: Label | None) -> Float[Array, " dim"]:
    """The row of ``label`` in a :func:`class_embedding`, the null class's (the last row)
    when ``label`` is None."""
    return embedding(embedding.num_embeddings - 1 if label is None else label)
