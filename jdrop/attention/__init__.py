"""Fused dot-product attention with dropout: blockwise, O(T) memory, flax's masks.

The forward pass visits the ``(Tq, Tk)`` logits one ``(block_q, block_k)`` tile at a time with an
online softmax (Rabe & Staats 2021; Dao et al. 2022); the backward pass recomputes each tile's
probabilities from the per-row logsumexp and regenerates its dropout mask from the key by global
index (:func:`jdrop.masks.bits_at`, :func:`jdrop.masks.index_words`), so no array of ``Tq x Tk``
elements is ever stored or built.

Sequence parallelism: with ``axis_name=`` (inside ``jax.shard_map``) the same function runs a ring
over the devices of that mesh axis, each holding a shard of the sequence, and every device draws
exactly its part of flax's mask by global index, so the result is the single-device call's on any
number of devices; :func:`sequence_parallel_attention` does it on global arrays.

One concern per file: ``_api`` (the public function and its checks), ``_layout`` (padding and
tiling into the kernel's layout, and back), ``_kernel`` (the tiles, the forward, forward-mode and
backward passes of one block pair at a global position, and the custom rule that composes them),
``_dropout_mask`` (the exact and fast masks a tile draws, for both implementations), ``_pallas`` (the Pallas kernels
of ``implementation="pallas"``, imported only when asked for), ``_ring`` (the kernel composed
across devices: the ring, its schedule and its custom_vjp), ``_sequence_parallel`` (the
global-array wrapper and the zigzag layout's helpers).

References: A. Vaswani et al., Attention is all you need, NeurIPS 2017; M. Rabe, C. Staats,
Self-attention does not need O(n^2) memory, arXiv:2112.05682, 2021; T. Dao, D. Fu, S. Ermon, A. Rudra,
C. Ré, FlashAttention: fast and memory-efficient exact attention with IO-awareness, NeurIPS 2022;
T. Dao, FlashAttention-2, arXiv:2307.08691, 2023; H. Liu, M. Zaharia, P. Abbeel, Ring attention with
blockwise transformers for near-infinite context, arXiv:2310.01889, 2023; W. Brandon et al., Striped
attention: faster ring attention for causal transformers, arXiv:2311.09431, 2023.
"""

from jdrop.attention._api import DEFAULT_BLOCK_K as DEFAULT_BLOCK_K
from jdrop.attention._api import DEFAULT_BLOCK_Q as DEFAULT_BLOCK_Q
from jdrop.attention._api import dot_product_attention as dot_product_attention
from jdrop.attention._ring import SEQUENCE_LAYOUTS as SEQUENCE_LAYOUTS
from jdrop.attention._sequence_parallel import AttentionOptions as AttentionOptions
from jdrop.attention._sequence_parallel import from_zigzag as from_zigzag
from jdrop.attention._sequence_parallel import sequence_parallel_attention as sequence_parallel_attention
from jdrop.attention._sequence_parallel import sequence_positions as sequence_positions
from jdrop.attention._sequence_parallel import to_zigzag as to_zigzag

__all__ = [
    "AttentionOptions",
    "DEFAULT_BLOCK_K",
    "DEFAULT_BLOCK_Q",
    "SEQUENCE_LAYOUTS",
    "dot_product_attention",
    "from_zigzag",
    "sequence_parallel_attention",
    "sequence_positions",
    "to_zigzag",
]
