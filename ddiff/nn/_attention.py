"""Multi-head attention with a choice of backend (written-out products, XLA's fused
formulation, cuDNN's kernel on GPU, the Pallas splash kernel on TPU), and the masks of
causal and block-causal attention."""

import hashlib
import logging
import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float

from ddiff._sharding import MODEL
from ddiff._typing import Key
from ddiff.nn._random import dropout

AttentionKind = Literal["auto", "dot_product_attention", "einsum", "cudnn", "splash"]
"""How :func:`attention` computes: ``auto`` picks per backend."""

AttentionMask = Bool[Array, "seq keys"] | Bool[np.ndarray, "seq keys"]
"""True where a query (row) may attend to a key (column). A numpy mask is static: the
splash kernel reads its structure and skips the tiles it masks out entirely."""

SPLASH_TILE = 128
"""The splash kernel's tile sizes are multiples of this, and so must its sequences be."""

SPLASH_MAX_BLOCK = 512
"""The largest query and key block of the splash kernel (:func:`splash_block`)."""

_LOGGER = logging.getLogger("ddiff")
_WARNED: set[str] = set()
_SPLASH_KERNELS: dict[tuple, Callable[..., Array]] = {}


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        _LOGGER.warning(message)


def attention(
    q: Float[Array, "seq heads head_dim"],
    k: Float[Array, "keys heads head_dim"],
    v: Float[Array, "keys heads head_dim"],
    *,
    kind: AttentionKind = "auto",
    dropout_rate: float = 0.0,
    key: Key | None = None,
    mask: AttentionMask | None = None,
) -> Float[Array, "seq heads head_dim"]:
    """softmax(q k^T / sqrt(head_dim)) v per head, with the scores and the softmax in
    float32 whatever the dtype of q, k, v: bidirectional, or with a ``mask`` only over the
    keys it allows for each query (each query must allow at least one: causal attention,
    :func:`causal_mask`; block-causal attention, :func:`block_causal_mask`).

    ``einsum`` writes the two products out, heads first (on CPU, where no fused kernel
    exists, the fastest); ``dot_product_attention`` goes through XLA's formulation of
    ``jax.nn.dot_product_attention``; ``cudnn`` through its cuDNN flash-attention kernel
    (GPU, bfloat16 or float16, head_dim a multiple of 8 up to 128; the causal mask as the
    kernel's own); ``splash`` through the Pallas splash kernel on TPU
    (:func:`splash_attention`: sequences a multiple of 128 and a static, numpy mask,
    whose fully masked tiles it skips). ``auto`` picks ``splash`` on TPU, ``cudnn`` on
    GPU and ``einsum`` on CPU, and the dense path of the backend (``einsum`` on CPU,
    ``dot_product_attention`` elsewhere) where the kernel cannot take the call (a mask
    computed inside the program, as a key-value cache's; a shape or dtype it lacks). An
    explicit ``cudnn`` or ``splash`` that cannot run says so once, in one logged warning,
    and takes the same dense path. Off TPU and GPU, ``auto`` and ``splash`` keep the
    splash kernel in the program for TPU (``jax.lax.platform_dependent``: chosen when the
    program is lowered), so a program compiled on this host ahead of time for a TPU
    topology uses the kernel. Dropout on the attention probabilities
    (training with ``dropout_rate`` > 0 and a key, :func:`dropout`) needs the
    probabilities themselves, so it always takes the ``einsum`` path.
    """
    if key is not None and dropout_rate > 0.0:
        return _einsum(q, k, v, mask, dropout_rate, key)
    if kind == "einsum":
        return _einsum(q, k, v, mask)
    if kind == "dot_product_attention":
        return _xla(q, k, v, mask)
    backend = jax.default_backend()
    static = _static(mask)
    cudnn_refusal = _cudnn_refusal(q, backend)
    if kind == "cudnn" and cudnn_refusal is not None:
        _warn_once(f"attention 'cudnn' cannot take this call ({cudnn_refusal}): it takes the dense path")
    if kind == "cudnn" or kind == "auto" and backend == "gpu":
        return _dense(q, k, v, mask, backend) if cudnn_refusal else _cudnn(q, k, v, mask, static)
    splash_refusal = _splash_refusal(q, k, mask, static)
    if splash_refusal is not None:
        if kind == "splash":
            _warn_once(f"attention 'splash' cannot take this call ({splash_refusal}): it takes the dense path")
        return _dense(q, k, v, mask, backend)
    if backend == "tpu":
        return splash_attention(q, k, v, mask=static)
    if kind == "splash":
        _warn_once(f"attention 'splash' is a TPU kernel: programs for {backend} take the dense path")
    return jax.lax.platform_dependent(
        q, k, v, tpu=lambda *a: splash_attention(*a, mask=static), default=lambda *a: _dense(*a, mask, backend)
    )


def _static(mask: AttentionMask | None) -> np.ndarray | None:
    """``mask`` as a numpy array where its values are known while tracing, else None."""
    if mask is None:
        return None
    try:
        return np.asarray(mask, bool)
    except jax.errors.TracerArrayConversionError:
        return None


def _dense(q: Array, k: Array, v: Array, mask: AttentionMask | None, backend: str) -> Array:
    """The dense path of ``backend``: ``einsum`` on CPU, ``dot_product_attention`` elsewhere."""
    return _einsum(q, k, v, mask) if backend == "cpu" else _xla(q, k, v, mask)


def _xla(q: Array, k: Array, v: Array, mask: AttentionMask | None) -> Array:
    return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[None])


def _einsum(
    q: Array, k: Array, v: Array, mask: AttentionMask | None, dropout_rate: float = 0.0,
    key: Key | None = None,
) -> Array:
    # Heads first, as the products want them (jnp.einsum would order the second
    # product's operands as v^T p^T, which runs at half the speed on CPU).
    q, k, v = (jnp.swapaxes(a, 0, 1) for a in (_prescaled(q), k, v))
    scores = jnp.matmul(q, jnp.swapaxes(k, 1, 2), preferred_element_type=jnp.float32)
    if mask is not None:
        scores = jnp.where(mask[None], scores, -jnp.inf)
    probs = dropout(jax.nn.softmax(scores, axis=-1), dropout_rate, key).astype(v.dtype)
    return jnp.swapaxes(jnp.matmul(probs, v), 0, 1)


def _prescaled(q: Array) -> Array:
    return q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)


def _is_causal(mask: np.ndarray | None) -> bool:
    return mask is not None and mask.shape[0] == mask.shape[1] and np.array_equal(mask, np.tri(len(mask), dtype=bool))


def _cudnn_refusal(q: Array, backend: str) -> str | None:
    """Why cuDNN's kernel cannot take queries ``q``, or None where it can."""
    if backend != "gpu":
        return f"a GPU kernel, on {backend}"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"needs bfloat16 or float16, got {q.dtype}"
    if q.shape[-1] % 8 or q.shape[-1] > 128:
        return f"head_dim {q.shape[-1]} is not a multiple of 8 up to 128"
    return None


def _cudnn(q: Array, k: Array, v: Array, mask: AttentionMask | None, static: np.ndarray | None) -> Array:
    causal = _is_causal(static)
    return jax.nn.dot_product_attention(
        q, k, v, mask=None if mask is None or causal else mask[None], is_causal=causal,
        implementation="cudnn",
    )


def _splash_refusal(q: Array, k: Array, mask: AttentionMask | None, static: np.ndarray | None) -> str | None:
    """Why the splash kernel cannot take queries ``q`` and keys ``k`` under ``mask``
    (``static`` its numpy value, where known), or None where it can."""
    if mask is not None and static is None:
        return "a mask computed inside the program"
    if q.shape[0] % SPLASH_TILE or k.shape[0] % SPLASH_TILE:
        return f"sequences of {q.shape[0]} and {k.shape[0]}, not multiples of {SPLASH_TILE}"
    model = _auto_model_devices()
    if q.shape[1] % model:
        return f"{q.shape[1]} heads that do not split over the model axis's {model} devices"
    return None


def splash_block(length: int) -> int:
    """The splash kernel's block along a sequence of ``length`` (a multiple of 128): the
    largest multiple of 128 that divides it, up to :data:`SPLASH_MAX_BLOCK`."""
    block = min(length, SPLASH_MAX_BLOCK) // SPLASH_TILE * SPLASH_TILE
    while length % block:
        block -= SPLASH_TILE
    return block


def _splash_mask(mask: np.ndarray | None, shape: tuple[int, int]) -> splash.Mask:
    """The kernel's mask of one head: full, causal (computed per tile) or from the array."""
    if mask is None:
        return splash.FullMask(shape)
    if _is_causal(mask):
        return splash.CausalMask(shape)
    return splash.NumpyMask(mask)


def _splash_kernel(
    mask: np.ndarray | None, shape: tuple[int, int], heads: int, block: int | None, interpret: bool
) -> Callable[..., Array]:
    """The splash kernel of ``heads`` heads under ``mask``, built once per mask, shape and
    block (its tile map is computed on the host, outside any trace)."""
    digest = None if mask is None else hashlib.sha1(np.packbits(mask)).hexdigest()
    cache_key = (digest, shape, heads, block, interpret)
    if cache_key not in _SPLASH_KERNELS:
        q_block, kv_block = (block or splash_block(n) for n in shape)
        blocks = splash.BlockSizes(
            block_q=q_block, block_kv=kv_block, block_kv_compute=kv_block,
            block_q_dkv=q_block, block_kv_dkv=kv_block, block_kv_dkv_compute=kv_block,
            block_q_dq=q_block, block_kv_dq=kv_block,
        )  # fmt: skip
        with jax.ensure_compile_time_eval():
            _SPLASH_KERNELS[cache_key] = splash.make_splash_mha(
                splash.MultiHeadMask([_splash_mask(mask, shape)] * heads), block_sizes=blocks,
                head_shards=1, q_seq_shards=1, interpret=interpret,
            )  # fmt: skip
    return _SPLASH_KERNELS[cache_key]


def splash_attention(
    q: Float[Array, "seq heads head_dim"],
    k: Float[Array, "keys heads head_dim"],
    v: Float[Array, "keys heads head_dim"],
    *,
    mask: Bool[np.ndarray, "seq keys"] | None = None,
    block: int | None = None,
    interpret: bool = False,
) -> Float[Array, "seq heads head_dim"]:
    """softmax(q k^T / sqrt(head_dim)) v per head by the Pallas splash-attention kernel
    (TPU): queries scaled by 1 / sqrt(head_dim), heads first, tiles of ``block`` queries
    by ``block`` keys (a multiple of 128 dividing both sequences; None: :func:`splash_block`
    of each), and the static ``mask`` (None: bidirectional; the causal mask as the
    kernel's own) turned into a block-sparse map of the tiles, so that those it masks out
    entirely are never computed.
    ``interpret`` runs the kernel in Pallas's interpreter, on any backend (slowly)."""
    shape = (q.shape[0], k.shape[0])
    static = None if mask is None else np.asarray(mask, bool)

    def run(q: Array, k: Array, v: Array) -> Array:
        kernel = _splash_kernel(static, shape, q.shape[1], block, interpret)
        out = kernel(*(jnp.swapaxes(a, 0, 1) for a in (_prescaled(q), k, v)))
        return jnp.swapaxes(out, 0, 1)

    model = _auto_model_devices()
    if model > 1 and q.shape[1] % model == 0:
        # The compiler cannot partition a Pallas kernel: under tensor parallelism (the
        # model axis left to it) each device runs the kernel on its own heads.
        spec = P(None, MODEL, None)
        return jax.shard_map(run, in_specs=(spec,) * 3, out_specs=spec, axis_names=frozenset({MODEL}), check_vma=False)(
            q, k, v
        )
    return run(q, k, v)


def _auto_model_devices() -> int:
    """Devices along the mesh axis ``model`` where the compiler partitions it (tensor
    parallelism inside the trainer's ``shard_map``), else 1."""
    mesh = jax.sharding.get_abstract_mesh()
    if MODEL not in getattr(mesh, "auto_axes", ()):
        return 1
    return dict(mesh.shape)[MODEL]


def causal_mask(seq_len: int) -> Bool[np.ndarray, "seq seq"]:
    """The mask of causal attention, true where query n may attend to key m: m <= n (a
    numpy array: static, so the splash and cuDNN kernels skip the masked tiles)."""
    return np.tri(seq_len, dtype=bool)


def block_causal_mask(seq_len: int, block_size: int) -> np.ndarray:
    """The attention mask of the vectorised block-diffusion pass (Arriola et al. 2025,
    sec. 3.2) over the concatenation [x_t, x_0] of 2 ``seq_len`` positions, true where
    query (row) may attend to key (column), with b(n) = (n mod seq_len) // ``block_size``:

    - block diagonal: noisy n to noisy m when b(n) = b(m) (a noisy block sees itself);
    - offset block causal: noisy n to clean m when b(m) < b(n) (and the clean blocks before);
    - block causal: clean n to clean m when b(m) <= b(n) (the clean sequence, block by block).

    A clean position never attends to a noisy one, so the keys and values of clean block b
    are those that a cache built block by block holds (:class:`KVCache`)."""
    block = np.arange(seq_len) // block_size
    query, key = block[:, None], block[None, :]
    noisy = np.concatenate([query == key, key < query], axis=1)
    clean = np.concatenate([np.zeros((seq_len, seq_len), bool), key <= query], axis=1)
    return np.concatenate([noisy, clean], axis=0)
